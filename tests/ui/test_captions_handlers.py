"""The Captions tab's handlers called directly on a copy of the demo project: no browser, the real engine and the
tiny BLIP-2 behind them. What each handler returns is what the widgets would show."""

from __future__ import annotations

import shutil
import threading
import time

import gradio as gr
import pytest

from engine.captions.store import CaptionStore
from engine.captions.style import StyleRules, save_style_rules
from engine.core.layout import Project
from engine.core.models import ModelChoice
from engine.jobs import JobRunner
from studio.context import AppContext
from tabs.captions import CAPTIONER_KINDS, CaptionsTab

NO_RULES = ("", "", "", False)  # trigger, replacement table, banned words, normalise
NO_VIDEO = ("", "", 4, "auto")  # video-language model, instruction, frames per second, memory mode


def no_progress(*_args, **_kwargs) -> None:
    return None


@pytest.fixture
def tab(demo_home, tmp_path) -> CaptionsTab:
    project = Project(shutil.copytree(demo_home / "demo", tmp_path / "demo"))  # the session's demo stays as it is
    settings = project.settings()
    return CaptionsTab(AppContext(project=project, models=ModelChoice(settings.wan_model, settings.captioner_model),
                                  device_description="CPU", jobs=JobRunner(tmp_path / "jobs")))


def test_load_edit_navigate_and_undo(tab):
    store = tab.store
    first, second = store.list_clips()[:2]
    video, caption, status, suggestion, replace_switch = tab.load_clip(first, *NO_RULES)
    assert video == str(store.clip_path(first)) and caption["value"] == store.read(first).text
    assert status.startswith(f"Loaded {first}.") and suggestion == "" and replace_switch["visible"] is False
    assert tab.load_clip("gone.mp4", *NO_RULES)[2] == f"gone.mp4 is no longer in {store.clips_dir}."

    status, rows = tab.save_caption(first, "a yellow ball, Goku", False, "", "", "goku", False)
    assert status.startswith("Saved at") and "**Banned words:** goku" in status
    assert store.read(first).text == "a yellow ball, Goku"
    assert [r[3] for r in rows if r[0] == first] == ["a yellow ball, Goku"]
    assert tab.save_caption(first, "a yellow ball, Goku", False, *NO_RULES)[0].startswith("Saved (no changes)")

    # Next saves the text being edited before it moves on; Previous at the first clip stays there.
    choice, _ = tab.next_clip(first, "a yellow ball, fast", False, *NO_RULES)
    assert choice["value"] == second and store.read(first).text == "a yellow ball, fast"
    assert tab.previous_clip(first, "a yellow ball, fast", False, *NO_RULES)[0]["value"] == first

    restored, status, _ = tab.undo(first, *NO_RULES)
    assert restored == "a yellow ball, Goku" == store.read(first).text and status.startswith("Undone.")
    with pytest.raises(gr.Error, match="Select a clip first"):
        tab.undo(None, *NO_RULES)
    with pytest.raises(gr.Error, match="Replacement line 1"):  # a bad rule line is named, nothing is saved
        tab.style_apply("All clips", first, "", "no equals sign here", "", False)
    assert not tab.rules_file.exists() and store.read(first).text == "a yellow ball, Goku"


def test_suggest_accept_and_gpu_busy(tab):
    clip = tab.store.list_clips()[0]
    suggestion, status, _ = tab.suggest_one(clip, CAPTIONER_KINDS[0], 1, "", 4, *NO_VIDEO, progress=no_progress)
    pending = tab.store.suggestion(clip)
    assert pending is not None and suggestion == pending.text and status == (
        f"Suggestion for {clip} ready: accept, append or ignore it.")
    assert tab.load_clip(clip, *NO_RULES)[3] == pending.text  # the editor shows the waiting suggestion

    caption, cleared, status, _ = tab.accept(clip, *NO_RULES)
    assert caption == pending.text == tab.store.read(clip).text and cleared == ""
    assert status.startswith("Suggestion accepted; saved.")
    assert tab.unload() == "Captioner unloaded; its memory is free."
    assert tab.unload() == "The captioner is not loaded."

    tasks, outcome = tab.ctx.jobs.tasks, {}

    def suggest():
        try:
            tab.suggest_one(clip, CAPTIONER_KINDS[0], 1, "", 4, *NO_VIDEO, progress=no_progress)
        except gr.Error as err:
            outcome["error"] = err.message

    with tasks.run("generation", "generating a video", "another page", gpu=True):
        # another page's GPU task: the suggestion waits for it, says for what, and can be stopped while it waits
        thread = threading.Thread(target=suggest)
        thread.start()
        deadline = time.monotonic() + 30
        while not any(t.kind == "captioning" and t.waiting_for for t in tasks.active()):
            assert time.monotonic() < deadline, "the suggestion never waited"
            time.sleep(0.05)
        assert tasks.active()[1].message == "waiting for generating a video to finish"
        with pytest.raises(gr.Error, match="A GPU task is running"):
            tab.unload()
        assert tab.stop_suggest() == "Stopping after the current batch..."  # this page's (no session: "") task
        thread.join(30)
    assert outcome["error"] == "captioning " + clip + " was stopped while waiting for generating a video."
    assert tab.stop_suggest() == "This page is not captioning."


def test_style_find_replace_export_and_import(tab, tmp_path):
    store = tab.store
    clips = store.list_clips()
    store.save(clips[0], "Goku leaps, wide shot")
    rules = ("sks", "Goku = a warrior", "", False)
    preview = tab.style_preview("This clip", clips[0], *rules)
    assert "<ins>sks" in preview and "<del>Goku" in preview and store.read(clips[0]).text == "Goku leaps, wide shot"
    html, current, _ = tab.style_apply("This clip", clips[0], *rules)
    assert current == "sks, a warrior leaps, wide shot" == store.read(clips[0]).text
    assert "1 caption(s) changed" in html and tab.rules_file.exists()  # applied rules are kept for the next session
    assert CaptionsTab(tab.ctx).base_rules.trigger == "sks"

    html, _, _ = tab.find_preview("static camera", "locked camera", False, False, True, clips[0])
    would = sum("static camera" in store.read(c).text for c in clips)
    assert f"{would} caption(s) would change" in html and would > 0
    tab.replace_all("static camera", "locked camera", False, False, True, clips[0])
    assert not any("static camera" in store.read(c).text for c in clips)

    exported, message = tab.export(".csv")
    assert message.startswith(f"{len(clips)} caption(s) exported")
    table = tmp_path / "edited.csv"
    table.write_text(f"clip,caption\n{clips[1]},a new caption\nnot a clip.mp4,x\n", encoding="utf-8")
    html, current, _ = tab.import_file_into_clips(str(table), False, clips[1])
    assert current == "a new caption" == CaptionStore(store.clips_dir).read(clips[1]).text
    assert "No such clip: not a clip.mp4" in html
    with pytest.raises(gr.Error, match="Choose a .jsonl or .csv"):
        tab.import_file_into_clips(None, False, clips[1])
    assert exported.endswith("captions.csv")


def test_video_captioner_suggests_through_the_style_rules_and_keeps_its_settings(tab, tiny_models):
    clip = tab.store.list_clips()[0]
    save_style_rules(StyleRules(trigger="zq style"), tab.rules_file)
    video = (tiny_models.video_captioner, "Describe only the camera.", 2, "auto")
    assert tab.save_video_settings(CAPTIONER_KINDS[1], *video[:3]).startswith("Captioner settings saved")
    settings = tab.ctx.project.settings()
    assert (settings.video_captioner_model, settings.caption_instruction, settings.caption_video_fps) == (
        tiny_models.video_captioner, "Describe only the camera.", 2.0)
    # A page load (a reload, another browser) shows what project.json holds, not what the server started with.
    assert tab.captioner_settings() == (CAPTIONER_KINDS[1], *video[:3])
    suggestion, status, _ = tab.suggest_one(clip, CAPTIONER_KINDS[1], 1, "", 4, *video, progress=no_progress)
    assert suggestion.startswith("zq style") and tab.store.suggestion(clip).text == suggestion
    with pytest.raises(gr.Error, match="Qwen2.5-VL folder or hub id"):
        tab.suggest_one(clip, CAPTIONER_KINDS[1], 1, "", 4, "", "x", 2, "auto", progress=no_progress)
    assert tab.unload() == "Captioner unloaded; its memory is free."
