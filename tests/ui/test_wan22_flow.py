"""Wan 2.2 in a real browser on the demo project: pick the 2.2 model in the Train tab, train the LoRA pair from the
demo clips, then generate with the pair at separate high-noise and low-noise strengths."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import expect

from engine.core.models import TINY_WAN22_DIRNAME
from tests.ui.conftest import wait_idle


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_choose_wan22_train_the_pair_and_generate_with_it(page, studio, stop_jobs_afterwards):
    url, root = studio
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    wait_idle(page)
    page.get_by_label("Wan 2.2 I2V A14B").check()
    expect(page.locator("#train-message")).to_contain_text("high-noise expert")
    page.get_by_role("button", name="Advanced settings").click()
    expect(page.locator("#train-run-toml")).to_contain_text("shift = 5.0")
    settings = json.loads((root / "project.json").read_text())
    assert Path(settings["wan_model"]).name == TINY_WAN22_DIRNAME  # the project remembers the model

    page.get_by_label("Run name").fill("pair run")
    page.get_by_role("button", name="Train").click()
    expect(page.locator("#train-message")).to_contain_text("Started pair run", timeout=60_000)
    epoch = root / "runs" / "pair run" / "epoch3"
    metrics = root / "runs" / "pair run" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and any(json.loads(line).get("phase") in ("done", "error")
                                               for line in metrics.read_text().splitlines()), 600, "the run to end")
    assert (epoch / "low_noise_model.safetensors").is_file(), metrics.read_text()[-2000:]
    assert (epoch / "high_noise_model.safetensors").is_file()

    page.reload()  # the page shows the project's model as project.json holds it, not the one the studio started with
    expect(page.locator("#studio-header")).to_contain_text(TINY_WAN22_DIRNAME)
    page.get_by_role("tab", name="Train").click()
    expect(page.get_by_label("Wan 2.2 I2V A14B")).to_be_checked()
    page.get_by_role("tab", name="Generate").click()  # it shows the strengths of the project's model family
    wait_idle(page)
    image = root.parent / "start.png"
    Image.fromarray((np.random.RandomState(1).rand(40, 64, 3) * 255).astype("uint8")).save(image)
    page.locator("#generate-image input[type=file]").set_input_files(str(image))
    page.get_by_label("Prompt", exact=True).fill("a yellow ball bouncing")
    for name, value in (("Frames", "9"), ("Steps", "4")):
        box = page.get_by_label(f"number input for {name}")
        box.fill(value)
        box.press("Enter")
    page.get_by_role("button", name="Size ▼").click()
    page.get_by_label("Height (0 = from image)").fill("16")
    page.get_by_label("Width (0 = from image)").fill("32")
    page.get_by_label("Width (0 = from image)").press("Tab")
    page.get_by_label("LoRA 1", exact=True).click()
    page.get_by_role("option", name="pair run / epoch3 (high+low pair)").click()
    low = page.get_by_label("Low-noise strength 1", exact=True)
    low.fill("0.5")
    low.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#generate-status")).to_contain_text("Wrote", timeout=240_000)
    sidecar = json.loads(next((root / "outputs").glob("gen-*.json")).read_text())
    assert [(Path(e["path"]).name, e["expert"], e["strength"]) for e in sidecar["loras"]] == [
        ("high_noise_model.safetensors", "high_noise", 1.0), ("low_noise_model.safetensors", "low_noise", 0.5)]
    assert sidecar["boundary_ratio"] == 0.9
    expect(page.locator("#generate-details")).to_contain_text("epoch3 low_noise @ 0.5")
