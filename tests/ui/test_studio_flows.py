"""One studio, two browser sessions at once: what one tab or page does shows in the others without a reload (exported
clips in Captions, new LoRA epochs in Generate, saved style rules after a reload), every running job is listed on
every page and can be stopped there, and a tab's own Stop stops only its own page's work."""

from __future__ import annotations

import re
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from engine.core.layout import Project
from engine.core.models import TINY_WAN_DIRNAME
from tests.engine.test_lora_io import make_lora_dir
from tests.ui.conftest import wait_idle


@pytest.fixture
def second_page(browser):
    """Another browser session (its own cookies and Gradio session) on the same studio."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def open_tab(page, url: str, name: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name=name).click()
    wait_idle(page)


def caption_table(page):
    return page.locator("#caption-clip-table")


def test_exported_clips_show_in_captions_on_both_pages_without_a_reload(page, second_page, studio):
    url, root = studio
    open_tab(second_page, url, "Captions")  # another session, left on the Captions tab
    expect(caption_table(second_page)).to_contain_text("ball bounce 1.mp4")
    page.goto(url)  # the Clips tab opens the first source
    expect(page.get_by_label("Position", exact=True)).to_have_value(re.compile("frame 0 of"))
    wait_idle(page)
    page.get_by_role("button", name="Add a clip here").click()
    expect(page.locator("#clips-cuts")).to_contain_text("1.0625")  # 17 frames at 16 fps from 0 s
    page.get_by_role("button", name="Export clips").click()
    expect(page.locator("#clips-export-status")).to_contain_text("Exported 1 clip", timeout=120_000)
    assert (root / "clips" / "demo source_000m00s000.mp4").exists()

    page.get_by_role("tab", name="Captions").click()  # selecting the tab re-reads the clips
    expect(caption_table(page)).to_contain_text("demo source_000m00s000.mp4")
    expect(caption_table(second_page)).to_contain_text("demo source_000m00s000.mp4")  # the job's end told it


def test_new_lora_epochs_appear_in_generate_while_it_is_open(page, studio):
    url, root = studio
    open_tab(page, url, "Generate")
    lora = page.get_by_label("LoRA 1", exact=True)
    tiny_wan = str(root.parent / "models" / TINY_WAN_DIRNAME)
    make_lora_dir(tiny_wan, root / "runs" / "later run" / "epoch3", seed=5)  # as a training run saves one
    lora.click()
    expect(page.get_by_role("option", name="later run / epoch3")).to_be_visible()


def test_style_rules_saved_with_apply_show_after_a_reload(page, studio):
    url, _ = studio
    open_tab(page, url, "Captions")
    expect(page.locator("#caption-save-status")).to_contain_text("Loaded")
    page.get_by_role("button", name="Pure-style tools").click()
    trigger, banned = page.get_by_label("Trigger word or prefix (put first)"), page.get_by_label(
        "Banned words (comma-separated)")
    trigger.fill("zq9")  # typed once: it must take
    banned.fill("yellow")
    expect(trigger).to_have_value("zq9")
    page.get_by_label("This clip").check()
    page.get_by_role("button", name="Preview", exact=True).first.click()
    expect(page.locator(".caption-banned")).to_contain_text("yellow")  # the preview names banned words left in
    page.get_by_role("button", name="Apply", exact=True).click()
    expect(page.get_by_label("Caption", exact=True)).to_have_value(re.compile("^zq9, "))
    expect(caption_table(page)).to_contain_text("banned: yellow")  # the clip list flags it too

    page.reload()
    page.get_by_role("tab", name="Captions").click()
    page.get_by_role("button", name="Pure-style tools").click()
    expect(page.get_by_label("Trigger word or prefix (put first)")).to_have_value("zq9")
    expect(page.get_by_label("Banned words (comma-separated)")).to_have_value("yellow")


def fill_generate_form(page, image, steps: str) -> None:
    page.locator("#generate-image input[type=file]").set_input_files(str(image))
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a warrior jumps, fast camera pan")
    for name, value in (("Frames", "9"), ("Steps", steps)):
        box = page.get_by_label(f"number input for {name}")
        box.fill(value)
        box.press("Enter")
    page.get_by_role("button", name="Size ▼").click()
    page.get_by_label("Height (0 = from image)").fill("16")
    page.get_by_label("Width (0 = from image)").fill("32")
    page.get_by_label("Width (0 = from image)").press("Tab")
    expect(page.locator("#generate-size")).to_contain_text("32x16")
    page.get_by_label("LoRA 1", exact=True).click()
    page.get_by_role("option", name="flows run / epoch1").click()
    wait_idle(page)


def test_a_sweep_from_a_closed_page_is_listed_waited_for_and_stopped_from_another(browser, studio, tmp_path):
    url, root = studio
    make_lora_dir(str(root.parent / "models" / TINY_WAN_DIRNAME), root / "runs" / "flows run" / "epoch1", seed=3)
    image = tmp_path / "start.png"
    Image.fromarray((np.random.RandomState(1).rand(40, 64, 3) * 255).astype("uint8")).save(image)

    first = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = first.new_page()
    open_tab(page, url, "Generate")
    fill_generate_form(page, image, "100")  # 4 variants x 100 steps: long enough to watch, the test stops it
    page.get_by_role("button", name="Run sweep").click()
    expect(page.locator("#studio-jobs-list")).to_contain_text("generating a sweep of 4 variants")
    expect(page.locator("#studio-jobs-list")).to_contain_text("this page")
    first.close()  # the sweep runs on without its page

    second = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        other = second.new_page()
        other.set_default_timeout(30_000)
        open_tab(other, url, "Generate")
        jobs = other.locator("#studio-jobs-list")
        expect(jobs).to_contain_text("generating a sweep of 4 variants")
        expect(jobs).to_contain_text("another page")
        fill_generate_form(other, image, "2")
        other.get_by_role("button", name="Generate", exact=True).click()
        status = other.locator("#generate-status")
        expect(status).to_contain_text("Waiting for generating a sweep of 4 variants to finish")  # not silent
        expect(jobs).to_contain_text("waiting")
        # This page's Stop stops this page's own waiting render, never the other page's sweep.
        other.get_by_role("button", name="Stop", exact=True).click()
        expect(status).to_contain_text("generating a video was stopped while waiting for generating a sweep")
        expect(jobs).to_contain_text("generating a sweep of 4 variants")
        # The job list stops the sweep from here.
        other.get_by_label("Running job").click()
        other.get_by_role("option", name=re.compile("generating a sweep of 4 variants")).click()
        other.get_by_role("button", name="Stop job").click()
        expect(jobs).to_contain_text("No jobs running.", timeout=120_000)
        other.get_by_role("button", name="Generate", exact=True).click()
        expect(status).to_contain_text("Wrote", timeout=180_000)
    finally:
        second.close()


def test_delete_all_cuts_can_be_undone_and_a_mistake_leaves_the_table_in_place(page, studio):
    url, root = studio
    Project(root).cache.cut_list_file("demo source.mp4").unlink(missing_ok=True)  # an empty cut list to start from
    page.goto(url)
    expect(page.get_by_label("Position", exact=True)).to_have_value(re.compile("frame 0 of"))
    wait_idle(page)
    cuts = page.locator("#clips-cuts")
    page.get_by_role("button", name="Delete all cuts").click()  # nothing to delete: a person's mistake
    expect(page.get_by_text("The cut list is already empty.")).to_be_visible()
    expect(cuts.get_by_role("columnheader", name="Start (s)")).to_be_visible()  # no error badge over the table
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)

    page.get_by_role("button", name="Add a clip here").click()
    expect(cuts).to_contain_text("1.0625")
    wait_idle(page)
    page.get_by_role("button", name="Delete all cuts").click()
    expect(cuts).not_to_contain_text("1.062")
    expect(page.get_by_text("Deleted 1 cut; 'Restore deleted cuts' brings them back.")).to_be_visible()
    page.get_by_role("button", name="Restore deleted cuts").click()
    expect(cuts).to_contain_text("1.062")  # back, as the cut list file keeps it (to the millisecond)
    log = root.parent / f"studio-{urlparse(url).port}.log"  # this studio's (the home may hold copied older ones)
    assert "Traceback" not in log.read_text()  # people's mistakes print no tracebacks in the terminal
