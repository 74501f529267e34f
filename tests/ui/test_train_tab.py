"""Train tab: in a real browser on the demo project with the tiny model and the real trainer (one click trains, the
loss plot gains points, Stop stops, Resume continues from the saved step, LoRA files and a sample appear); and the
tab's computations (loss curves, pre-flight estimate, TOML round trip) without a browser."""

from __future__ import annotations

import json
import re
import shutil
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect

from tests.ui.conftest import running_studio, wait_idle


def demo_clips(project_root: Path) -> list[Path]:
    """The demo project's captioned clips (engine.demo ships them pre-cut)."""
    from engine.core.layout import Project

    project = Project(project_root)
    clips = project.list_clips()
    assert len(clips) >= 2 and all(project.caption_path(c).read_text().strip() for c in clips)
    return clips


def setting(page, key: str):
    """A field of the generated settings form: its accessible name is the TOML key followed by its help."""
    return page.get_by_role("textbox", name=re.compile(rf"^{re.escape(key)} "))


def type_setting(page, key: str, text: str, shows: str) -> None:
    """Type into a settings field once, as a person does, and leave it: the run TOML must then show `shows`."""
    field = setting(page, key)
    expect(field).to_be_editable()
    field.fill("")
    field.press_sequentially(text)
    field.press("Tab")
    expect(page.locator("#train-run-toml .cm-content")).to_contain_text(shows)


def steps_logged(page) -> int:
    """Points in the loss plot, as the line under it counts them."""
    match = re.search(r"(\d+) steps logged", page.locator("#train-plot-info").inner_text(timeout=60_000))
    return int(match.group(1)) if match else 0


def wait_until(predicate, timeout: float, what: str, page=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    log = page.get_by_role("textbox", name="Log", exact=True).input_value() if page is not None else ""
    raise AssertionError(f"timed out waiting for {what}; log tail:\n{log}")


def test_train_stop_resume_in_the_browser(page, studio, stop_jobs_afterwards):
    url, root = studio
    demo_clips(root)
    run_dir = root / "runs" / "browser run"
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    expect(page.get_by_label("Preset")).to_have_value("CPU demo (tiny model)")  # chosen for a tiny model on a CPU
    wait_idle(page)

    # Many epochs (the test stops the run itself), a LoRA and a state every 5 epochs and a sample after the first,
    # set through the generated form.
    page.get_by_role("button", name="Advanced settings").click()
    page.get_by_role("button", name="run.toml (top level)").click()
    type_setting(page, "epochs", "10000", "epochs = 10000")
    type_setting(page, "save_every_n_epochs", "5", "save_every_n_epochs = 5")
    type_setting(page, "checkpoint_every_n_epochs", "5", "checkpoint_every_n_epochs = 5")
    page.get_by_role("button", name="run.toml [studio.samples]").click()
    type_setting(page, "studio.samples.epochs", "[1]", "1,")
    page.get_by_label("Run name").fill("browser run")
    still = root.parent / "my still.png"
    import cv2

    cv2.imwrite(str(still), np.full((128, 224, 3), (40, 200, 90), np.uint8))
    page.locator("#train-sample-image input[type=file]").set_input_files(str(still))
    expect(page.locator("#train-sample-image img")).to_have_count(1)

    page.get_by_role("button", name="Train").click()
    expect(page.locator("#train-message")).to_contain_text("Started browser run", timeout=60_000)
    first = wait_until(lambda: steps_logged(page), 600, "the first training step", page)
    wait_until(lambda: steps_logged(page) > first, 120, "the loss plot to gain points", page)
    # The project's first run draws at once: its legend names the two curves (an untyped empty table before the
    # first step used to leave a -Infinity..Infinity colour ramp until a reload).
    expect(page.locator("#train-loss svg")).to_contain_text("smoothed")
    expect(page.locator("#train-loss svg")).not_to_contain_text("Infinity")
    status = page.locator("#train-status")
    expect(status).to_contain_text("browser run: running")
    page.reload()  # the page holds nothing: it finds the run again from its files
    page.get_by_role("tab", name="Train").click()
    expect(status).to_contain_text("browser run: running")

    # A restarted studio (a second studio process on the same home, which never started the job) re-attaches to the
    # run and stops it.
    with running_studio(root.parent) as second_url:
        other = page.context.new_page()
        other.goto(second_url)
        other.get_by_role("tab", name="Train").click()
        expect(other.locator("#train-status")).to_contain_text("browser run: running", timeout=30_000)
        other.get_by_role("button", name="Stop", exact=True).click()
        expect(other.locator("#train-status")).to_contain_text("browser run: stopped", timeout=120_000)
        other.close()
    expect(status).to_contain_text("browser run: stopped")
    stop = page.get_by_role("button", name="Stop", exact=True)
    saved = max(int(p.name.removeprefix("step")) for p in (run_dir / "state").glob("step*"))
    record = json.loads((run_dir / "job.json").read_text())
    assert record["stop_requested"] and not record["killed"]  # it stopped on its own, within the grace period

    resume = page.get_by_role("button", name="Resume")
    expect(resume).to_be_enabled(timeout=15_000)
    resume.click()
    expect(page.locator("#train-message")).to_contain_text("Resumed browser run")
    log = page.get_by_role("textbox", name="Log", exact=True)
    expect(log).to_have_value(re.compile(rf"Resuming from .*\(step {saved}\)"), timeout=300_000)
    wait_until(lambda: steps_logged(page) > saved, 300, "steps after the resume", page)
    # LoRA files (every 5 epochs) and the sample of epoch 1 show up while it trains.
    expect(page.get_by_label("LoRA file")).to_have_value(re.compile(r"browser run · epoch \d+"), timeout=300_000)
    expect(page.locator("#train-samples video")).to_have_count(1, timeout=300_000)
    stop.click()
    expect(status).to_contain_text("browser run: stopped", timeout=120_000)

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed_at = max(i for i, e in enumerate(events) if "Resuming from" in e.get("message", ""))
    steps_after = [e["step"] for e in events[resumed_at:] if e["event"] == "step"]
    assert steps_after[0] == saved + 1, f"resume started at step {steps_after[0]}, saved state was step {saved}"
    assert steps_after == list(range(saved + 1, saved + 1 + len(steps_after)))
    samples = [e for e in events if e["event"] == "sample"]
    assert [e["epoch"] for e in samples] == [1] and Path(samples[0]["path"]).stat().st_size > 0
    from engine.training.config import load_run_config

    assert load_run_config(run_dir / "run.toml").studio.samples.image == str(run_dir / "sample start.png")
    assert (run_dir / "sample start.png").read_bytes() == still.read_bytes()  # the chosen still, kept with the run
    loras = sorted(run_dir.glob("epoch*/adapter_model.safetensors"))
    assert loras and all(p.stat().st_size > 0 for p in loras)
    epochs = sorted(int(p.parent.name.removeprefix("epoch")) for p in loras)
    assert all(epoch % 5 == 0 for epoch in epochs)
    expect(page.get_by_label("LoRA file")).to_have_value(f"browser run · epoch {epochs[-1]}")
    table = page.get_by_label("Runs")
    expect(table).to_contain_text("stopped")
    expect(table).to_contain_text(", ".join(map(str, epochs)))

    page.get_by_role("button", name="Open in Generate").click()
    expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_label("LoRA 1", exact=True)).to_have_value(f"browser run / epoch{epochs[-1]}")


# --- the tab's computations, without a browser ---------------------------------------------------------------------

def test_settings_round_trip_on_the_demo_project(demo_home, tmp_path):
    from engine.core.layout import Project
    from engine.training.config import load_run_config, to_toml
    from engine.training.presets import PRESET_CPU_DEMO
    from engine.training.runs import write_run_folder
    from engine.training.schema import ConfigError
    from tabs.train import configs_from_text, draft_configs

    project = Project(shutil.copytree(demo_home / "demo", tmp_path / "demo"))  # the session's demo stays as it is
    model = project.settings().wan_model
    run, dataset = draft_configs(PRESET_CPU_DEMO, project.clips_dir, model)
    run2, dataset2 = configs_from_text(to_toml(run), to_toml(dataset))
    assert to_toml(run2) == to_toml(run) and to_toml(dataset2) == to_toml(dataset)
    with pytest.raises(ConfigError, match=r"'epochs' in run.toml must be"):  # names the file, not a scratch copy
        configs_from_text(to_toml(run).replace(f"epochs = {run.epochs}", 'epochs = "many"'), to_toml(dataset))

    run_toml = write_run_folder(project.run("a run"), run, dataset)
    loaded = load_run_config(run_toml)
    assert loaded.output_path() == project.run_dir("a run")
    assert loaded.dataset_path() == project.run_dir("a run") / "dataset.toml"


def test_import_a_diffusion_pipe_toml_and_export_ours(demo_home, tmp_path):
    """The tab's handlers, on a studio built in-process (no browser): import the min-VRAM example, export a pair."""
    from engine.core.layout import Project
    from engine.core.models import ModelChoice
    from engine.jobs import JobRunner
    from engine.training.config import load_dataset_config, load_run_config
    from studio.app import build
    from studio.context import AppContext

    project = Project(shutil.copytree(demo_home / "demo", tmp_path / "demo"))
    settings = project.settings()
    ctx = AppContext(project=project, models=ModelChoice(settings.wan_model, settings.captioner_model),
                     device_description="CPU", jobs=JobRunner(tmp_path / "jobs", device="CPU"))
    build(ctx)
    tab = ctx.ui["train"]
    draft = tab.draft.value
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "min_vram.toml"
    out = tab.on_import([str(fixture)], draft)
    assert "Imported run settings from `min_vram.toml`" in out[tab.message]
    assert "not on this machine" in out[tab.message]  # /models/Wan2.1-... is replaced by the studio's model
    assert "Not used by the studio (kept for diffusion-pipe): eval_every_n_epochs" in out[tab.message]
    imported = out[tab.draft]
    assert "blocks_to_swap = 32" in imported["run"] and 'type = "AdamW8bitKahan"' in imported["run"]
    assert imported["dataset"] == draft["dataset"]  # the dataset file was not imported: ours stays
    assert out[tab.run_fields["blocks_to_swap"]] == "32"  # the form shows the imported values
    assert out[tab.run_fields["activation_checkpointing"]] == "unsloth"

    export = tab.on_export("my run", imported)
    run_toml, dataset_toml = map(Path, export[tab.export_files]["value"])
    raw = tomllib.loads(run_toml.read_text(encoding="utf-8"))  # diffusion-pipe reads these from its own folder
    assert Path(raw["output_dir"]) == project.run_dir("my run") and Path(raw["dataset"]) == dataset_toml
    assert "absolute paths" in export[tab.message] and "diffusion-pipe reads the original Wan" in export[tab.message]
    run = load_run_config(run_toml)
    assert run.blocks_to_swap == 32 and run.model.ckpt_path == settings.wan_model
    assert run.dataset_path() == dataset_toml.resolve()
    assert load_dataset_config(dataset_toml).directory_path(load_dataset_config(dataset_toml).directory[0]) == (
        project.clips_dir)

    for name in ("../../..", str(tmp_path / "elsewhere"), ".hidden"):  # run names that would leave runs/
        assert "Warning: Run name" in tab.on_export(name, imported)[tab.message]
        assert "Warning: Run name" in tab.on_train(name, imported, "1", None)[0]
        assert "Warning: Run name" in tab.on_resume(name, "1") and "Warning: Run name" in tab.on_stop(name)
    assert not (tmp_path / "elsewhere").exists() and not (project.root / "run.toml").exists()

    with ctx.jobs.gpu_slot("captioning"):  # e.g. the Captions tab is suggesting captions
        message, _ = tab.on_train("blocked run", imported, "1", None)
    assert "captioning is using the CPU" in message and not project.run_dir("blocked run").exists()

    from engine.captions.style import StyleRules, save_style_rules

    assert "Banned words" not in tab.on_check(imported, "1", None)
    save_style_rules(StyleRules(banned_words=["yellow"]), project.style_rules_file)  # as the Captions tab saves them
    check = tab.on_check(imported, "1", None)
    assert check.startswith("**Ready to train.**")  # a warning, not an error
    assert "**Banned words** (from `caption_style.toml`" in check and "- ball bounce 1.mp4: yellow" in check

    bad = tmp_path / "bad.toml"
    bad.write_text('epochs = "many"\n')
    assert "Could not import `bad.toml`" in tab.on_import([str(bad)], draft)[tab.message]
