"""Generate tab in a real browser: a video with a LoRA from the project's runs, then a 3-strength sweep in a grid."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from engine.core.models import TINY_WAN_DIRNAME
from tests.engine.test_lora_io import make_lora_dir
from tests.ui.conftest import wait_idle


@pytest.fixture(scope="module")
def generate_studio(studio, tmp_path_factory):
    """The module's studio with a run holding one LoRA epoch, and a start image on disk."""
    url, project_root = studio
    tiny_wan = str(project_root.parent / "models" / TINY_WAN_DIRNAME)
    make_lora_dir(tiny_wan, project_root / "runs" / "browser-run" / "epoch1", seed=3)
    image = tmp_path_factory.mktemp("img") / "start frame.png"
    Image.fromarray((np.random.RandomState(1).rand(40, 64, 3) * 255).astype("uint8")).save(image)
    return url, project_root, image


def fill_small_settings(page, image):
    page.locator("#generate-image input[type=file]").set_input_files(str(image))
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a warrior jumps, fast camera pan")
    prompt.press("Tab")
    for name, value in (("Frames", "9"), ("Steps", "2")):
        box = page.get_by_label(f"number input for {name}")
        box.fill(value)
        box.press("Enter")
    page.get_by_role("button", name="Size ▼").click()
    page.get_by_label("Height (0 = from image)").fill("16")
    page.get_by_label("Width (0 = from image)").fill("32")
    page.get_by_label("Width (0 = from image)").press("Tab")
    expect(page.locator("#generate-size")).to_contain_text("32x16")


def test_generate_with_a_lora_then_sweep_three_strengths(page, generate_studio):
    url, project_root, image = generate_studio
    page.goto(url)
    page.get_by_role("tab", name="Generate").click()
    wait_idle(page)
    fill_small_settings(page, image)
    page.get_by_label("LoRA 1", exact=True).click()
    page.get_by_role("option", name="browser-run / epoch1").click()

    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#generate-status")).to_contain_text("Wrote", timeout=180_000)
    sidecars = [json.loads(p.read_text()) for p in (project_root / "outputs").glob("gen-*.json")]
    assert len(sidecars) == 1
    assert sidecars[0]["loras"][0]["strength"] == 1.0
    assert sidecars[0]["request"]["frames"] == 9 and sidecars[0]["request"]["width"] == 32
    expect(page.locator("#generate-details")).to_contain_text("epoch1 @ 1")

    strengths = page.get_by_label("Sweep strengths (LoRA 1)")
    strengths.fill("0, 0.5, 1")
    strengths.press("Tab")
    expect(strengths).to_have_value("0, 0.5, 1")
    page.get_by_role("button", name="Run sweep").click()
    expect(page.locator("#generate-status")).to_contain_text("Sweep of 3 variants", timeout=240_000)
    grid = page.locator("#generate-grid video")
    expect(grid).to_have_count(3)
    expect(page.locator("#generate-grid")).to_contain_text("strength 0.5")
    expect(page.locator("#generate-comparison video")).to_be_visible()
    for i in range(3):  # each grid video is served
        response = page.request.get(url.rstrip("/") + grid.nth(i).get_attribute("src"))
        assert response.ok and len(response.body()) > 1000
    page.get_by_role("button", name="Play grid together").click()
    expect(page.locator("#generate-details")).to_contain_text("strength 0 (base)")

    # the first video's settings go back into the form; its ComfyUI workflow downloads
    first = sorted((project_root / "outputs").glob("gen-*.mp4"))[0].name
    page.get_by_role("button", name="Refresh").click()
    page.get_by_label("Output", exact=True).click()
    page.get_by_role("option", name=first).click()
    expect(page.locator("#generate-output-details")).to_contain_text("epoch1 @ 1")
    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_role("button", name="Send settings to the form").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a warrior jumps, fast camera pan")
    expect(page.get_by_label("fixed")).to_be_checked()
    expect(page.get_by_label("Seed", exact=True)).to_have_value(str(sidecars[0]["request"]["seed"]))
    page.get_by_role("button", name="Export ComfyUI workflow").click()
    download = page.locator("#generate-comfy-file").get_by_role("link")
    expect(download).to_have_attribute("href", re.compile(r"\.comfyui\.json$"))
    workflow = json.loads(next((project_root / "outputs").glob("gen-*.comfyui.json")).read_text())
    assert any(node["class_type"] == "LoraLoaderModelOnly" for node in workflow.values())


def test_draft_then_render_in_full(page, generate_studio):
    """Point once at an accelerator LoRA file, render a draft (4 LCM steps, no guidance), then Render in full: the
    same seed and LoRA strength at the form's full settings, without the accelerator."""
    from tests.engine.test_lora_io import ACCELERATOR

    url, project_root, image = generate_studio
    page.goto(url)
    page.get_by_role("tab", name="Generate").click()
    wait_idle(page)
    expect(page.locator("#generate-draft-note")).to_contain_text("previews motion, not final quality")
    fill_small_settings(page, image)
    page.get_by_label("LoRA 1", exact=True).click()
    page.get_by_role("option", name="browser-run / epoch1").click()
    strength = page.get_by_label("Strength 1", exact=True)
    strength.fill("0.7")
    strength.press("Enter")
    accelerator = page.get_by_label("Accelerator LoRA file")
    accelerator.fill(str(ACCELERATOR))
    accelerator.press("Tab")
    page.get_by_label("Draft", exact=True).check()
    expect(accelerator).to_have_value(str(ACCELERATOR))
    expect(strength).to_have_value("0.7")

    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#generate-status")).to_contain_text("Wrote draft", timeout=180_000)
    expect(page.locator("#generate-details")).to_contain_text("previews motion, not final quality")
    draft_file = next((project_root / "outputs").glob("draft-*.json"))
    draft = json.loads(draft_file.read_text())
    assert (draft["request"]["steps"], draft["request"]["guidance"], draft["request"]["scheduler"]) == (4, 1.0, "lcm")
    assert [lora[1] for lora in draft["request"]["loras"]] == [0.7, 1.0]
    assert json.loads((project_root / "project.json").read_text())["draft_lora"] == str(ACCELERATOR)  # remembered

    page.get_by_role("button", name="Refresh").click()
    page.get_by_label("Output", exact=True).click()
    page.get_by_role("option", name=draft_file.with_suffix(".mp4").name).click()
    expect(page.locator("#generate-output-details")).to_contain_text("Draft")
    page.get_by_role("button", name="Render in full").click()
    expect(page.locator("#generate-status")).to_contain_text("full-quality render of draft", timeout=180_000)
    full = json.loads(next((project_root / "outputs").glob("full-*.json")).read_text())
    assert full["request"]["seed"] == draft["request"]["seed"] and full["full_of"] == draft["video"]
    assert (full["request"]["steps"], full["request"]["scheduler"]) == (2, "unipc")
    assert [lora[1] for lora in full["request"]["loras"]] == [0.7] and "draft" not in full


def test_form_helpers(tmp_path):
    from engine.generate.request import GenerationError
    from tabs.generate import grid_html, parse_strengths, run_epochs

    assert parse_strengths("0, 0.5;1") == [0.0, 0.5, 1.0]
    with pytest.raises(GenerationError, match="Sweep strength is 3, but a LoRA strength is a number from -1 to 2"):
        parse_strengths("0, 3")
    with pytest.raises(GenerationError, match="numbers"):
        parse_strengths("low, high")
    from engine.generate.request import check_strength

    with pytest.raises(GenerationError, match="Strength 1 is 5, but a LoRA strength is a number from -1 to 2"):
        check_strength(5, "Strength 1")  # the one rule: a LoRA row's strength is answered as the sweep box is
    for epoch in (10, 2, 1):
        (tmp_path / "run" / f"epoch{epoch}").mkdir(parents=True)
        (tmp_path / "run" / f"epoch{epoch}" / "adapter_model.safetensors").write_bytes(b"x")
    epochs = run_epochs(str(tmp_path / "run" / "epoch2" / "adapter_model.safetensors"))
    assert [label for label, _ in epochs] == ["epoch1", "epoch2", "epoch10"]
    assert run_epochs(str(tmp_path / "some.safetensors")) == []
    html = grid_html([tmp_path / "a b.mp4"], ["strength 1"], [0.5])
    assert "a%20b.mp4" in html and "autoplay muted loop" in html
