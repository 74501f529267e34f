"""Train tab: one click trains a LoRA on the project's clips; a live loss plot, stop and resume, runs and samples.

Thin UI over engine.training (presets, generated form, TOML, the preflight check, events, run summaries) and
engine.jobs (the child process, the studio-wide GPU lock). Everything shown is read back from the run folders, so a
page reload or a studio restart picks a running or finished run up where it is.
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
import tempfile
import threading
import tomllib
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd
from gradio.context import Context

from engine.captions.store import CaptionStore
from engine.captions.style import banned_words_by_caption, load_style_rules
from engine.captions.text import CaptionError
from engine.core.families import FAMILIES, family_of
from engine.core.files import TextFileError, atomic_path, read_text
from engine.core.hardware import list_gpus
from engine.core.layout import DATASET_TOML, RunLayout
from engine.core.video import VideoError, probe_video
from engine.jobs import GpuBusyError, Job, JobError, training_argv
from engine.training.check import human_seconds, preflight
from engine.training.config import load_dataset_config, load_run_config, to_toml
from engine.training.events import (
    Event,
    EventFollower,
    PhaseEvent,
    ProgressEvent,
    StepEvent,
    last_of,
    parse_line,
)
from engine.training.form import apply_overrides, describe_fields
from engine.training.interop import export_for_diffusion_pipe, notices
from engine.training.presets import preset_configs, presets, recommended_preset
from engine.training.runs import RunSummary, loss_curve, summarize_run, write_run_folder
from engine.training.schema import ConfigError, DatasetConfig, RunConfig
from studio.context import AppContext

TITLE = "Train"
REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 600.0  # a 14B step plus saving the resume state can take minutes on a 24 GB card
REFRESH_S = 1.0
LOG_LINES = 12
SETTINGS_QUEUE = "train-settings"  # settings edits and Train run one at a time, in the order they were made
SAMPLE_MIN_WIDTH = 160  # samples narrower than this (the demo's 80x48) are enlarged by a whole factor
PLOT_POINTS = 2000  # plots thin longer curves to this many points
STUDIO_KEYS = ("output_dir", "dataset")  # set by the studio: a run writes into its own folder, dataset.toml beside


# --- what the tab computes (no widgets) --------------------------------------------------------------------------

def draft_configs(preset: str, clips_dir: Path, model_path: str) -> tuple[RunConfig, DatasetConfig]:
    """The preset's configs for this project: output_dir "." (the run folder holding run.toml), dataset beside it."""
    return preset_configs(preset, clips_dir=clips_dir, output_dir=".", model_path=model_path,
                          dataset_file=DATASET_TOML)


def configs_from_text(run_text: str, dataset_text: str) -> tuple[RunConfig, DatasetConfig]:
    """Parse the two TOML texts exactly as the trainer will read them (ConfigError names the bad key)."""
    with tempfile.TemporaryDirectory(prefix="wan-studio-config-") as folder:
        scratch = RunLayout(Path(folder))
        run_path, dataset_path = scratch.run_toml, scratch.dataset_toml
        run_path.write_text(run_text, encoding="utf-8")
        dataset_path.write_text(dataset_text, encoding="utf-8")
        try:
            return load_run_config(run_path), load_dataset_config(dataset_path)
        except ConfigError as err:  # name the file as the person sees it, not the scratch copy
            raise ConfigError(str(err).replace(f"{folder}/", "")) from None


def loss_frame(events: list[Event]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's loss curve (engine.training.runs.loss_curve) as the plots take it: raw and smoothed, and the lr."""
    curve = loss_curve(events).thinned(PLOT_POINTS)
    losses = pd.DataFrame({"step": curve.steps * 2, "loss": curve.loss + curve.smoothed,
                           "curve": ["raw"] * len(curve.steps) + ["smoothed"] * len(curve.steps)})
    return losses, pd.DataFrame({"step": curve.steps, "lr": curve.lr})


def status_html(summary: RunSummary | None, events: list[Event], epochs: int | None) -> str:
    """One status line with a progress bar: phase, epoch, step, steps/s, ETA, time per epoch, GPU memory."""
    if summary is None:
        return '<div id="train-status">No runs yet: press <b>Train</b>.</div>'
    last_step = last_of(events, StepEvent)
    last_progress = next((e for e in reversed(events) if isinstance(e, (ProgressEvent, PhaseEvent))), None)
    parts = [f"<b>{html.escape(summary.name)}</b>: {html.escape(summary.state)}"]
    if summary.phase:
        parts.append(f"phase {html.escape(summary.phase)}")
    value, maximum = 0.0, 1.0
    if last_step:
        value, maximum = float(last_step.step), float(last_step.max_steps or last_step.step)
        parts.append(f"epoch {last_step.epoch}")
        parts.append(f"step {last_step.step} / {last_step.max_steps}")
        rate = last_step.steps_per_s
        if rate:
            parts.append(f"{rate:.3g} steps/s")
            if epochs and last_step.max_steps:
                parts.append(f"≈ {human_seconds(last_step.max_steps / epochs / rate)} per epoch")
        if summary.state in ("running", "stopping"):
            parts.append(f"ETA {human_seconds(last_step.eta_s)}")
        if last_step.gpu_mem_gib is not None:
            parts.append(f"GPU {last_step.gpu_mem_gib:.1f} GiB")
    if isinstance(last_progress, ProgressEvent) and summary.phase in (None, "cache"):
        value, maximum = last_progress.fraction, 1.0
        parts.append(html.escape(last_progress.message))
    message = "" if summary.state in ("running", "finished") else f"<div>{html.escape(summary.message)}</div>"
    return (f'<div id="train-status">{" · ".join(parts)}{message}'
            f'<progress aria-label="Training progress" value="{value:g}" max="{maximum:g}" '
            f'style="width:100%"></progress></div>')


# --- the tab -------------------------------------------------------------------------------------------------------

class TrainTab:
    """The widgets and their handlers; one per studio (handlers read everything back from disk)."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.project = ctx.project
        self.jobs = ctx.jobs
        self.gpus = list_gpus()
        self._followers: dict[Path, EventFollower] = {}
        self._followers_lock = threading.Lock()
        self.run_fields: dict[str, gr.components.Component] = {}
        self.dataset_fields: dict[str, gr.components.Component] = {}

    # reading runs
    def run_dirs(self) -> list[Path]:
        """Run folders, newest first."""
        return [p for p in reversed(self.project.list_runs()) if not p.name.startswith(".")]

    def events(self, run_dir: Path) -> list[Event]:
        with self._followers_lock:
            follower = self._followers.setdefault(run_dir, EventFollower(RunLayout(run_dir).metrics_file))
            return list(follower.refresh())

    def summary(self, run_dir: Path) -> tuple[RunSummary, list[Event], Job | None]:
        events = self.events(run_dir)
        job = self.jobs.attach(run_dir)
        return summarize_run(RunLayout(run_dir), events, job), events, job

    def running_run(self) -> str | None:
        job = self.jobs.current()
        if job and job.run_dir.parent == self.project.runs_dir.resolve():
            return job.run_dir.name
        return None

    # building
    def build(self) -> None:
        model = self.ctx.wan_model()
        preset = recommended_preset(model)
        run_cfg, dataset_cfg = draft_configs(preset, self.project.clips_dir, model)
        gr.Markdown("Train a motion-style LoRA on this project's clips. Pick the preset for your GPU and press "
                    "**Train**; the settings below are optional.")
        families = self.ctx.wan_models()
        self.family = gr.Radio([(FAMILIES[key].title, key) for key in families], value=family_of(model).key,
                               label="Model", elem_id="train-family",
                               info="Wan 2.2 trains a LoRA for each of its experts (high-noise and low-noise) in "
                                    "one run; the project remembers the choice.")
        with gr.Row():
            self.preset = gr.Dropdown(list(presets()), value=preset, label="Preset",
                                      info="Chosen for this machine: " + self.ctx.device_description)
            gpu_info = ", ".join(f"GPU {g.index}: {g.name} ({g.total_gib:.0f} GiB)" for g in self.gpus)
            self.num_gpus = gr.Dropdown([str(n) for n in range(1, len(self.gpus) + 1)] or ["1"],
                                        value=str(max(1, len(self.gpus))), label="GPUs", info=gpu_info,
                                        visible=len(self.gpus) > 1)
            self.run_name = gr.Textbox(label="Run name", placeholder="empty: run-<date>-<time>")
            self.sample_image = gr.Image(label="Sample start image", type="filepath", sources=["upload", "clipboard"],
                                         height=120, elem_id="train-sample-image")
        gr.Markdown("Samples while training start from this still (empty: the first frame of the first clip), at the "
                    "epochs in *studio.samples.epochs* under Advanced settings.")
        with gr.Row():
            self.check_button = gr.Button("Check dataset")
            self.train_button = gr.Button("Train", variant="primary")
            self.stop_button = gr.Button("Stop", variant="stop", interactive=False)
            self.resume_button = gr.Button("Resume", interactive=False)
        self.message = gr.Markdown(elem_id="train-message")
        with gr.Accordion("Advanced settings", open=False):
            gr.Markdown("Every setting of the run and dataset TOML files (diffusion-pipe's format plus a `[studio]` "
                        "table). Edits in the form rewrite the TOML below; edits in the TOML are used as typed "
                        "(*Apply TOML* shows them in the form).")
            self._build_form(run_cfg, dataset_cfg)
            with gr.Row():
                self.run_toml = gr.Code(to_toml(run_cfg), language=None, label="run.toml", interactive=True,
                                    elem_id="train-run-toml")
                self.dataset_toml = gr.Code(to_toml(dataset_cfg), language=None, label="dataset.toml",
                                            interactive=True, elem_id="train-dataset-toml")
            with gr.Row():
                self.apply_button = gr.Button("Apply TOML")
                self.import_button = gr.UploadButton("Import diffusion-pipe TOML", file_types=[".toml"],
                                                     file_count="multiple")
                self.export_button = gr.Button("Export TOML")
            self.export_files = gr.File(label="Exported files", file_count="multiple", visible=False)
        # The settings being edited, kept on the server: form fields, the TOML editors and Train all go through it
        # one event at a time (SETTINGS_QUEUE), so a quick edit followed by a click is never lost to a stale copy.
        self.draft = gr.State({"run": to_toml(run_cfg), "dataset": to_toml(dataset_cfg)})
        self.status = gr.HTML(status_html(None, [], None))
        with gr.Row():
            self.loss_plot = gr.LinePlot(x="step", y="loss", color="curve", label="Loss", height=260,
                                         elem_id="train-loss")
            self.lr_plot = gr.LinePlot(x="step", y="lr", label="Learning rate", height=260)
        self.plot_info = gr.Markdown(elem_id="train-plot-info")
        self.log_tail = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False, autoscroll=True)
        self.samples = gr.HTML(samples_html([]), label="Samples by epoch", elem_id="train-samples")
        with gr.Row():
            self.run_select = gr.Dropdown([], label="Run", interactive=True, allow_custom_value=True)
            self.lora_select = gr.Dropdown([], label="LoRA file", interactive=True, allow_custom_value=True)
            self.open_button = gr.Button("Open in Generate")
        self.runs_table = gr.Dataframe(headers=["Run", "Status", "Step", "Final loss", "Duration", "LoRA epochs"],
                                       label="Runs", interactive=False, wrap=True)
        self.view = gr.State({})  # what this page shows already, so unchanged parts are not sent again
        self.timer = gr.Timer(REFRESH_S)
        self._wire()
        self.ctx.ui["train.lora"] = self.lora_select
        self.ctx.ui["train.open_lora"] = self.open_button

    def _build_form(self, run_cfg: RunConfig, dataset_cfg: DatasetConfig) -> None:
        sections: dict[str, list] = {}
        for target, cfg in (("run", run_cfg), ("dataset", dataset_cfg)):
            for info in describe_fields(cfg):
                if target == "run" and info.key in STUDIO_KEYS:
                    continue
                section = info.key.rsplit(".", 1)[0] if "." in info.key else ""
                sections.setdefault(f"{target}.toml " + (f"[{section}]" if section else "(top level)"), []).append(
                    (target, info))
        for title, items in sections.items():
            with gr.Accordion(title, open=False):
                for target, info in items:
                    fields = self.run_fields if target == "run" else self.dataset_fields
                    fields[info.key] = _field_component(info)

    def _form_values(self, run_cfg: RunConfig | None, dataset_cfg: DatasetConfig | None) -> dict:
        out = {}
        for cfg, fields in ((run_cfg, self.run_fields), (dataset_cfg, self.dataset_fields)):
            if cfg is None:
                continue
            for info in describe_fields(cfg):
                if info.key in fields:
                    out[fields[info.key]] = info.value if info.type == "true/false" else _text(info.value)
        return out

    def _wire(self) -> None:
        form = [*self.run_fields.values(), *self.dataset_fields.values()]
        toml, draft = [self.run_toml, self.dataset_toml], self.draft
        serial = dict(concurrency_id=SETTINGS_QUEUE, concurrency_limit=1)
        self.preset.input(self.on_preset, [self.preset], [draft, *toml, *form, self.message], **serial)
        self.family.input(self.on_family, [self.family, self.preset], [draft, *toml, *form, self.message], **serial)
        # A page load shows the model project.json holds (chosen on another page, or before a reload): the page was
        # built with the one the studio started with.
        Context.root_block.load(self.on_page_load, [self.family, self.preset],
                                [self.family, draft, *toml, *form, self.message], **serial)
        for target, fields in (("run", self.run_fields), ("dataset", self.dataset_fields)):
            for key, component in fields.items():
                # every keystroke is applied, in order (each reads the draft the previous one wrote)
                component.input(partial(self.on_field, target, key), [component, draft],
                                [draft, *toml, self.message], trigger_mode="multiple", **serial)
                if isinstance(component, gr.Textbox):
                    # Fast typing can leave the last keystroke's event carrying a value a letter short (the browser
                    # reads the field before it updates): leaving the field applies what it finally holds.
                    component.blur(partial(self.on_field, target, key), [component, draft],
                                   [draft, *toml, self.message], trigger_mode="always_last", **serial)
        for name, editor in (("run", self.run_toml), ("dataset", self.dataset_toml)):
            editor.input(partial(self.on_toml_edit, name), [editor, draft], [draft], trigger_mode="multiple",
                         **serial)
        self.apply_button.click(self.on_apply_toml, [draft], [*form, self.message], **serial)
        self.import_button.upload(self.on_import, [self.import_button, draft], [draft, *toml, *form, self.message],
                                  **serial)
        self.export_button.click(self.on_export, [self.run_name, draft], [self.export_files, self.message], **serial)
        self.check_button.click(self.on_check, [draft, self.num_gpus, self.run_select], [self.message], **serial)
        self.train_button.click(self.on_train, [self.run_name, draft, self.num_gpus, self.sample_image],
                                [self.message, self.run_select], **serial)
        self.stop_button.click(self.on_stop, [self.run_select], [self.message])
        self.resume_button.click(self.on_resume, [self.run_select, self.num_gpus], [self.message])
        live = [self.status, self.loss_plot, self.lr_plot, self.plot_info, self.log_tail, self.samples,
                self.runs_table, self.run_select, self.lora_select, self.train_button, self.stop_button,
                self.resume_button, self.view]
        self.timer.tick(self.on_tick, [self.run_select, self.view], live, show_progress="hidden")
        self.run_select.input(self.on_tick, [self.run_select, gr.State({})], live, show_progress="hidden")

    # handlers: settings
    def _show_draft(self, run_text: str, dataset_text: str) -> dict:
        return {self.draft: {"run": run_text, "dataset": dataset_text}, self.run_toml: run_text,
                self.dataset_toml: dataset_text}

    def on_preset(self, preset: str) -> dict:
        run_cfg, dataset_cfg = draft_configs(preset, self.project.clips_dir, self.ctx.wan_model())
        return {**self._show_draft(to_toml(run_cfg), to_toml(dataset_cfg)), **self._form_values(run_cfg, dataset_cfg),
                self.message: f"Preset **{preset}**."}

    def on_family(self, key: str, preset: str) -> dict:
        """Switch the project to the family's model folder (saved in project.json) and redraft the preset."""
        folder = self.ctx.wan_models()[key]
        self.project.save_settings(dataclasses.replace(self.project.settings(), wan_model=folder))
        family = family_of(folder)
        experts = " and ".join(e.label for e in family.experts) if len(family.experts) > 1 else "its transformer"
        return {**self.on_preset(preset),
                self.message: f"Model **{family.title}** (`{folder}`): one run trains a LoRA for {experts}; preset "
                              f"**{preset}**."}

    def on_page_load(self, shown: str, preset: str) -> dict:
        """The project's model family when the page shows another one, with the preset redrafted for it; else
        nothing changes (a page that is right is left alone)."""
        key = family_of(self.ctx.wan_model()).key
        if key == shown:
            return gr.skip()
        return {self.family: key, **self.on_preset(preset)}

    def on_field(self, target: str, key: str, value, draft: dict) -> dict:
        run_text, dataset_text = draft["run"], draft["dataset"]
        try:
            run_cfg, dataset_cfg = configs_from_text(run_text, dataset_text)
            if target == "run":
                run_text = to_toml(apply_overrides(run_cfg, {key: value}))
            else:
                dataset_text = to_toml(apply_overrides(dataset_cfg, {key: value}))
        except ConfigError as err:
            return {self.message: f"Warning: {err}"}
        return {**self._show_draft(run_text, dataset_text), self.message: ""}

    def on_toml_edit(self, name: str, text: str, draft: dict) -> dict:
        return {**draft, name: text}

    def on_apply_toml(self, draft: dict) -> dict:
        try:
            run_cfg, dataset_cfg = configs_from_text(draft["run"], draft["dataset"])
        except ConfigError as err:
            return {self.message: f"Warning: {err}"}
        return {**self._form_values(run_cfg, dataset_cfg),
                self.message: " ".join(["Settings read from the TOML.", *notices(run_cfg, dataset_cfg)])}

    def on_import(self, files: list, draft: dict) -> dict:
        """Take a diffusion-pipe run TOML and/or dataset TOML; the studio keeps its own run folder and clip paths
        unless the dataset file is imported too."""
        notes, remarks = [], []
        run_text, dataset_text = draft["run"], draft["dataset"]
        run_cfg = dataset_cfg = None
        for file in files or []:
            path = Path(getattr(file, "name", file))
            try:
                if "directory" in _toml_keys(path):
                    dataset_cfg = load_dataset_config(path)
                    notes.append(f"dataset settings from `{path.name}`")
                else:
                    run_cfg = apply_overrides(load_run_config(path), {"output_dir": ".", "dataset": DATASET_TOML})
                    notes.append(f"run settings from `{path.name}`")
                    model = run_cfg.model.ckpt_path
                    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
                        run_cfg = apply_overrides(run_cfg, {"model.ckpt_path": self.ctx.wan_model()})
                        remarks.append(f"The file's model `{model}` is not on this machine: using this studio's model.")
            except ConfigError as err:
                return {self.message: f"Warning: Could not import `{path.name}`: {err}"}
        remarks += notices(run_cfg, dataset_cfg)
        if run_cfg is not None:
            run_text = to_toml(run_cfg)
        if dataset_cfg is not None:
            dataset_text = to_toml(dataset_cfg)
        return {**self._show_draft(run_text, dataset_text), **self._form_values(run_cfg, dataset_cfg),
                self.message: " ".join([f"Imported {' and '.join(notes)}." if notes else "Nothing imported.",
                                        *remarks])}

    def on_export(self, run_name: str, draft: dict) -> dict:
        try:
            run_cfg, dataset_cfg = configs_from_text(draft["run"], draft["dataset"])
            name = run_name.strip() or "run"
            run_dir = self.project.run_dir(name)  # relative paths read as that run's folder reads them
            folder = Path(tempfile.mkdtemp(prefix="wan-studio-export-")) / name
            exported = export_for_diffusion_pipe(run_cfg, dataset_cfg, folder, base_dir=run_dir)
        except (ConfigError, ValueError) as err:
            return {self.message: f"Warning: {err}"}
        return {self.export_files: gr.update(value=[str(exported.run_toml), str(exported.dataset_toml)],
                                             visible=True),
                self.message: " ".join(["run.toml and dataset.toml are ready to download: a diffusion-pipe pair with "
                                        "absolute paths (it runs from any folder); the `[studio]` table holds our "
                                        "extras.", *exported.notices])}

    # handlers: running
    def _measured_rate(self, run_name: str | None) -> float | None:
        try:
            run_dir = self.project.run_dir(run_name) if run_name else None
        except ValueError:
            return None
        if run_dir is None or not run_dir.is_dir():
            return None
        step = next((e for e in reversed(self.events(run_dir)) if isinstance(e, StepEvent) and e.steps_per_s), None)
        return step.steps_per_s if step else None

    def _preflight_text(self, run_cfg, dataset_cfg, num_gpus: str, measured) -> tuple[bool, str]:
        check = preflight(run_cfg, dataset_cfg, num_gpus=int(num_gpus or 1), measured_steps_per_s=measured)
        parts = []
        if check.errors:
            parts.append("**Errors (fix these first):**\n" + "\n".join(f"- {e}" for e in check.errors))
        if check.warnings:
            parts.append("**Warnings:**\n" + "\n".join(f"- Warning: {w}" for w in check.warnings))
        parts.append(check.estimate())
        return check.ok, "\n\n".join(parts)

    def on_check(self, draft: dict, num_gpus: str, selected: str | None) -> str:
        try:
            run_cfg, dataset_cfg = configs_from_text(draft["run"], draft["dataset"])
        except ConfigError as err:
            return f"Warning: {err}"
        ok, text = self._preflight_text(run_cfg, dataset_cfg, num_gpus, self._measured_rate(selected))
        return ("**Ready to train.**\n\n" if ok else "") + text + self._banned_words_text()

    def _banned_words_text(self) -> str:
        """Captions still holding a banned word of the project's style rules (a warning: training may go on)."""
        rules_file = self.project.style_rules_file
        try:
            banned = load_style_rules(rules_file).banned_words if rules_file.exists() else []
            captions, _ = CaptionStore(self.project.clips_dir).readable_captions()
        except (CaptionError, OSError) as err:
            return f"\n\nBanned words not checked: {err}"
        found = banned_words_by_caption(captions, banned)
        if not found:
            return ""
        lines = "\n".join(f"- {clip}: {', '.join(words)}" for clip, words in found.items())
        return (f"\n\n**Banned words** (from `{rules_file.name}`; the Captions tab's style tools replace them) in "
                f"{len(found)} caption(s):\n{lines}")

    def on_train(self, run_name: str, draft: dict, num_gpus: str, sample_image: str | None):
        try:
            run_cfg, dataset_cfg = configs_from_text(draft["run"], draft["dataset"])
            name = run_name.strip() or self.project.new_run_name()
            run = self.project.run(name)
        except (ConfigError, ValueError) as err:
            return f"Warning: {err}", gr.skip()
        if run.root.exists():
            return (f"Warning: Run **{name}** exists already: choose another name, or select it and press Resume.",
                    gr.skip())
        if self.jobs.gpu_holder():
            return f"Warning: {self.jobs.busy_message()}", gr.skip()
        ok, report = self._preflight_text(run_cfg, dataset_cfg, num_gpus, None)
        if not ok:
            return report, gr.skip()
        try:
            if sample_image:  # kept with the run, so a resume or a later look finds the same still
                still = run.sample_start_image(Path(sample_image).suffix)
                run.root.mkdir(parents=True)
                with atomic_path(still) as tmp:
                    shutil.copyfile(sample_image, tmp)
                run_cfg = apply_overrides(run_cfg, {"studio.samples.image": str(still)})
            run_toml = write_run_folder(run, run_cfg, dataset_cfg)
            self.jobs.start(name, training_argv(run_toml, num_gpus=int(num_gpus or 1)), cwd=REPO, run_dir=run.root,
                            description=f"training run {name!r}", watches_stop_request=True)
        except (GpuBusyError, JobError, OSError) as err:
            shutil.rmtree(run.root, ignore_errors=True)  # created just now: leave no half-made run behind
            return f"Warning: {err}", gr.skip()
        return f"Started **{name}**.\n\n{report}", gr.Dropdown(choices=self._run_choices(), value=name)

    def on_resume(self, selected: str | None, num_gpus: str) -> str:
        if not selected:
            return "Warning: Select a run to resume."
        try:
            run = self.project.run(selected)
        except ValueError as err:
            return f"Warning: {err}"
        try:
            self.jobs.start(selected, training_argv(run.run_toml, resume=True, num_gpus=int(num_gpus or 1)),
                            cwd=REPO, run_dir=run.root, description=f"training run {selected!r}",
                            watches_stop_request=True)
        except (GpuBusyError, JobError) as err:
            return f"Warning: {err}"
        return f"Resumed **{selected}** from its last saved state (its status is below)."

    def on_stop(self, selected: str | None) -> str:
        try:
            job = self.jobs.attach(self.project.run_dir(selected)) if selected else None
        except ValueError as err:
            return f"Warning: {err}"
        if job is None or not job.is_running():
            return "Nothing to stop: the selected run is not running."
        # The stop waits for the current step and the state save; a thread keeps the page responsive meanwhile.
        threading.Thread(target=self.jobs.stop, args=(job, STOP_GRACE_S), name=f"stop {selected}",
                         daemon=True).start()
        return (f"Stopping **{selected}**: it finishes the current step and saves its state (killed after "
                f"{STOP_GRACE_S:.0f} s if it does not).")

    # handlers: live view
    def _run_choices(self) -> list[str]:
        return [p.name for p in self.run_dirs()]

    def on_tick(self, selected: str | None, view: dict) -> list:
        names = self._run_choices()
        if selected not in names:
            selected = self.running_run() or (names[0] if names else None)
        rows, current = [], None
        for run_dir in self.run_dirs():
            summary, events, job = self.summary(run_dir)
            rows.append([summary.name, summary.state, f"{summary.step or 0} / {summary.max_steps or '?'}",
                         f"{summary.final_loss:.4g}" if summary.final_loss is not None else "",
                         human_seconds(summary.duration_s) if summary.duration_s else "",
                         ", ".join(str(epoch) for epoch, _ in summary.loras)])
            if summary.name == selected:
                current = (summary, events, job)
        view = dict(view or {})
        out: dict = {}

        def changed(key: str, value) -> bool:
            if view.get(key) == value:
                return False
            view[key] = value
            return True

        summary, events, job = current or (None, [], None)
        epochs = _run_epochs(summary.run_dir) if summary else None
        out["status"] = status_html(summary, events, epochs)
        holder = self.jobs.gpu_holder()
        if holder and (summary is None or holder.get("run_dir") != str(summary.run_dir)):
            busy = html.escape(holder["description"])
            out["status"] += f'<div id="train-gpu-busy">{busy} is using the {self.jobs.device}.</div>'
        n_steps = sum(1 for e in events if isinstance(e, StepEvent))
        if changed("plot", (selected, n_steps)):
            losses, rates = loss_frame(events)
            last = losses["loss"].iloc[len(losses) // 2 - 1] if len(losses) else None
            # no steps yet: no table at all (None). The plot builds its legend from the first table it gets, so an
            # empty one would leave a project's first run without legend entries until a reload.
            out["loss"], out["lr"] = (losses, rates) if len(losses) else (None, None)
            out["info"] = (f"{len(losses) // 2} steps logged, last loss {last:.4g}" if last is not None
                           else "No steps logged yet.")
        tail = readable_log(job.log_tail(400) if job else [json.dumps(e.to_json()) for e in events], LOG_LINES)
        out["log"] = "\n".join(tail) if changed("log", tail) else gr.skip()
        samples = [(epoch, str(path)) for epoch, path in summary.samples] if summary else []
        out["samples"] = samples_html(samples) if changed("samples", samples) else gr.skip()
        out["table"] = rows if changed("table", rows) else gr.skip()
        out["runs"] = gr.Dropdown(choices=names, value=selected) if changed("runs", (names, selected)) else gr.skip()
        loras = [(f"{summary.name} · epoch {epoch}", str(path)) for epoch, path in reversed(summary.loras)
                 ] if summary else []
        out["loras"] = (gr.Dropdown(choices=loras, value=loras[0][1] if loras else None)
                        if changed("loras", loras) else gr.skip())
        running = bool(job and job.is_running())
        gpu_busy = holder is not None
        can_resume = bool(summary and summary.state not in ("finished", "running", "stopping")
                          and RunLayout(summary.run_dir).state_root.is_dir())
        buttons = (not gpu_busy, running, can_resume and not gpu_busy)
        if changed("buttons", buttons):
            out["buttons"] = [gr.Button(interactive=b) for b in buttons]
        else:
            out["buttons"] = [gr.skip()] * 3
        return [out["status"], out.get("loss", gr.skip()), out.get("lr", gr.skip()), out.get("info", gr.skip()),
                out["log"], out["samples"], out["table"], out["runs"], out["loras"], *out["buttons"], view]


def samples_html(samples: list[tuple[int, str]]) -> str:
    """The training samples at their own size (a small one enlarged by a whole factor, pixels kept sharp), each
    labelled with its epoch and size."""
    if not samples:
        return '<div class="train-samples-empty">Samples by epoch: none yet.</div>'
    from tabs.generate import file_url

    cells = []
    for epoch, path in samples:
        try:
            info = probe_video(path)
        except VideoError:
            continue
        scale = max(1, SAMPLE_MIN_WIDTH // info.width)
        cells.append(f'<figure class="train-sample"><video src="{html.escape(file_url(Path(path)))}" autoplay muted '
                     f'loop playsinline width="{info.width * scale}" height="{info.height * scale}" '
                     f'style="image-rendering:pixelated"></video><figcaption>epoch {epoch} · {info.width}x'
                     f'{info.height}{f" (shown x{scale})" if scale > 1 else ""}</figcaption></figure>')
    return f'<div class="train-samples"><b>Samples by epoch</b><div class="train-sample-row">{"".join(cells)}</div></div>'


def readable_log(lines: list[str], keep: int) -> list[str]:
    """The log for people: events as short sentences, step and progress events left out (the status line and the
    plots show those), plain output (warnings, tracebacks) as it is."""
    out = []
    for line in lines:
        event = parse_line(line)
        if event is None:
            out.append(line)
        elif not isinstance(event, (StepEvent, ProgressEvent)):
            out.append(event.describe())
    return out[-keep:]


def _run_epochs(run_dir: Path) -> int | None:
    try:
        return load_run_config(RunLayout(run_dir).run_toml).epochs
    except ConfigError:
        return None


def _toml_keys(path: Path) -> set[str]:
    try:
        return set(tomllib.loads(read_text(path)))
    except (OSError, TextFileError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path.name} is not a readable TOML file: {err}") from None


def _text(value) -> str:
    """A setting as the form shows it: TOML-style literals for numbers, lists and booleans, plain text for text."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _field_component(info) -> gr.components.Component:
    label, help_text = info.key, info.help  # the dotted TOML key: unique, and what a diffusion-pipe user knows
    if info.type == "true/false":
        return gr.Checkbox(value=bool(info.value), label=label, info=help_text)
    if info.choices:
        return gr.Dropdown([_text(c) for c in info.choices], value=_text(info.value), label=label, info=help_text)
    return gr.Textbox(value=_text(info.value), label=label, info=help_text, max_lines=1)


def build(ctx: AppContext) -> None:
    ctx.ui["train"] = TrainTab(ctx)
    ctx.ui["train"].build()


def connect(ctx: AppContext) -> None:
    """"Open in Generate": put the chosen LoRA into the Generate tab's first LoRA slot and switch to that tab."""
    tab: TrainTab = ctx.ui["train"]
    target, tabs = ctx.ui.get("generate.lora"), ctx.ui.get("tabs")
    if target is None or tabs is None:
        tab.open_button.click(lambda: "The Generate tab does not take LoRAs in this build.", None, [tab.message])
        return
    from tabs.generate import lora_choices

    def open_in_generate(path: str | None):
        if not path:
            return gr.skip(), gr.skip(), "Warning: Choose a LoRA file first."
        return gr.Dropdown(choices=lora_choices(ctx), value=path), gr.Tabs(selected="generate"), ""

    tab.open_button.click(open_in_generate, [tab.lora_select], [target, tabs, tab.message])
