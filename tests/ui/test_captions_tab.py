"""Captions tab in a real browser: an edited caption survives a page reload; Suggest fills a suggestion."""

import re

import numpy as np
import pytest
from playwright.sync_api import expect

from engine.captions.store import CaptionStore
from engine.core.ffmpeg import write_video
from tests.ui.conftest import wait_idle

CLIPS = ("captions test A.mp4", "captions test B é.mp4")


@pytest.fixture(scope="module")
def captions_studio(studio):
    """The module's studio with two clips of our own added after start (the tab re-reads clips on page load)."""
    url, project_root = studio
    clips_dir = project_root / "clips"
    for i, name in enumerate(CLIPS):
        frames = [np.full((48, 64, 3), (40 * i + 10 * t) % 255, np.uint8) for t in range(9)]
        write_video(frames, clips_dir / name, fps=8)
    return url, clips_dir


def open_captions(page, url, clip):
    page.goto(url)
    page.get_by_role("tab", name="Captions").click()
    status = page.locator("#caption-save-status")
    expect(status).to_contain_text("Loaded")  # the page load's own refresh (it selects the first clip) has landed
    wait_idle(page)
    dropdown = page.get_by_label("Clip", exact=True)
    dropdown.click()
    page.get_by_role("option", name=clip).click()
    expect(status).to_contain_text(f"Loaded {clip}")  # typing before this would race the clip's load
    wait_idle(page)


def test_edited_caption_is_saved_and_survives_reload(page, captions_studio):
    url, clips_dir = captions_studio
    open_captions(page, url, CLIPS[1])
    caption = page.get_by_label("Caption", exact=True)
    text = "a warrior with golden hair, leaping over a river, wide shot, émigré style"
    caption.fill(text)
    caption.blur()
    expect(page.locator("#caption-save-status")).to_contain_text("Saved at")
    assert (clips_dir / "captions test B é.txt").read_text(encoding="utf-8") == text
    expect(page.locator("#caption-clip-table")).to_contain_text("edited")

    page.reload()
    open_captions(page, url, CLIPS[1])
    expect(page.get_by_label("Caption", exact=True)).to_have_value(text)


def test_suggest_fills_a_suggestion_and_accept_saves_it(page, captions_studio):
    url, clips_dir = captions_studio
    open_captions(page, url, CLIPS[0])
    page.get_by_role("button", name="Suggest", exact=True).click()
    suggestion = page.get_by_label("Suggestion", exact=True)
    expect(suggestion).to_have_value(re.compile(r"\w+"), timeout=90_000)
    expect(page.locator("#caption-suggest-status")).to_contain_text("ready")
    pending = CaptionStore(clips_dir).suggestion(CLIPS[0])
    assert pending is not None and pending.text == suggestion.input_value()
    assert not (clips_dir / "captions test A.txt").exists()  # a suggestion is not a caption until accepted

    page.get_by_role("button", name="Accept", exact=True).click()
    expect(page.get_by_label("Caption", exact=True)).to_have_value(pending.text)
    expect(suggestion).to_have_value("")
    assert (clips_dir / "captions test A.txt").read_text(encoding="utf-8") == pending.text


def test_style_tools_preview_apply_and_undo(page, captions_studio):
    url, clips_dir = captions_studio
    clip = CLIPS[1]
    store = CaptionStore(clips_dir)
    store.save(clip, "Goku leaps over a river, wide shot, GOKU")
    open_captions(page, url, clip)
    page.get_by_text("Pure-style tools").click()
    trigger = page.get_by_label("Trigger word or prefix (put first)")
    expect(trigger).to_be_editable()
    trigger.fill("sks")  # typed once: it must take
    trigger.press("Tab")
    expect(trigger).to_have_value("sks")
    page.get_by_role("textbox", name=re.compile("^Replacement table")).fill("Goku = a warrior with golden hair")
    page.get_by_label("This clip").check()
    page.get_by_role("button", name="Preview", exact=True).first.click()
    diff = page.locator("table.caption-diff")
    expect(diff).to_contain_text("a warrior with golden hair")
    expect(diff.locator("ins").first).to_contain_text("sks")
    expect(diff.locator("del").first).to_contain_text("Goku")
    assert store.read(clip).text == "Goku leaps over a river, wide shot, GOKU"  # a preview changes nothing

    page.get_by_role("button", name="Apply", exact=True).click()
    expected = "sks, a warrior with golden hair, a warrior with golden hair leaps over a river, wide shot"
    expect(page.get_by_label("Caption", exact=True)).to_have_value(expected)
    assert store.read(clip).text == expected
    page.get_by_role("button", name="Undo", exact=True).click()
    expect(page.get_by_label("Caption", exact=True)).to_have_value("Goku leaps over a river, wide shot, GOKU")
    assert store.read(clip).text == "Goku leaps over a river, wide shot, GOKU"
