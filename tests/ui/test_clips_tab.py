"""The Clips tab in a real browser: scrub the demo source, mark a cut, export it, see it listed and on disk."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import expect

from engine.core.video import probe_video
from tests.ui.conftest import wait_idle


def test_scrub_mark_export_and_list(page, studio):
    url, project_root = studio
    page.goto(url)
    expect(page.locator("#clips-info")).to_contain_text("demo source.mp4", timeout=60_000)
    expect(page.locator("#clips-info")).to_contain_text("640x360")
    wait_idle(page)
    position = page.get_by_label("Position")

    # scrub: type a time into the slider's number box, then step one frame and one second
    time_box = page.get_by_label("number input for Time (s)")
    time_box.fill("3.5")
    time_box.press("Enter")
    expect(position).to_have_value(re.compile(r"^00:00:03\.500 · frame 84 of 720"))
    page.get_by_role("button", name="+1 frame").click()
    expect(position).to_have_value(re.compile(r"frame 85 of 720"))
    page.get_by_role("button", name="+1 s").click()
    expect(position).to_have_value(re.compile(r"^00:00:04\.542 · frame 109 "))
    page.get_by_role("button", name="-1 s").click()
    expect(position).to_have_value(re.compile(r"frame 85 of 720"))
    expect(page.locator("#clips-preview img")).to_be_visible()

    # mark a cut and add it with the project's clip length (17 frames)
    page.get_by_role("button", name="Mark in").click()
    expect(page.get_by_label("In (s)")).to_have_value("3.542")
    page.get_by_role("button", name="Add a clip here").click()
    cuts = page.locator("#clips-cuts")
    expect(cuts).to_contain_text("3.542")
    expect(cuts).to_contain_text("17")
    expect(cuts).to_contain_text("ok")

    # export it and find it in the list and on disk
    page.get_by_role("button", name="Export clips").click()
    expect(page.locator("#clips-export-status")).to_contain_text("Exported 1 clip", timeout=60_000)
    expect(page.locator("#clips-exported")).to_contain_text("demo source_000m03s542.mp4")
    clip = project_root / "clips" / "demo source_000m03s542.mp4"
    info = probe_video(clip)
    assert (info.frame_count, info.width, info.height, info.fps) == (17, 224, 128, 16.0)
    assert '"first_source_frame": 85' in (project_root / "clips" / "manifest.jsonl").read_text()


def test_suggest_and_play_selection(page, studio):
    url, project_root = studio
    page.goto(url)
    expect(page.locator("#clips-info")).to_contain_text("demo source.mp4", timeout=60_000)
    grid = page.locator("#clips-cuts [role=grid]")  # aria-rowcount: the header row + one row per cut
    expect(grid).to_have_attribute("aria-rowcount", "2")  # the cut added by the test above, kept on disk
    wait_idle(page)
    count = page.get_by_label("How many suggestions")
    count.fill("2")
    count.press("Tab")
    page.get_by_role("button", name="Suggest dynamic windows").click()
    expect(grid).to_have_attribute("aria-rowcount", "4", timeout=60_000)
    expect(page.locator("#clips-cuts")).not_to_contain_text("overlaps")
    page.get_by_role("button", name="Play selection").click()
    expect(page.locator("video")).to_have_count(1, timeout=60_000)
    assert list((project_root / "cache" / "previews").glob("selection *.mp4"))


def test_tab_handlers_without_a_browser(tmp_path):
    """The handlers a browser cannot reach easily: upload checks, timestamps import/export, delete, bad cells."""
    import gradio as gr
    import pytest

    from engine.core.layout import Project
    from engine.core.models import ModelChoice
    from engine.jobs import JobRunner
    from studio.context import AppContext
    from tabs.clips import ClipsTab
    from tests.engine.test_clips_videos import make_indexed_video

    project = Project.open(tmp_path / "proj é", clip_frames=9, clip_width=64, clip_height=48)
    tab = ClipsTab(AppContext(project=project, models=ModelChoice(wan="", captioner=""), device_description="CPU",
                              jobs=JobRunner(tmp_path / "jobs")))
    video = make_indexed_video(tmp_path / "my 'film'.mp4", "24", 96)
    choice = tab.add_upload(str(video))
    assert choice.value == "my 'film'.mp4" and (project.sources_dir / "my 'film'.mp4").exists()
    (tmp_path / "second camera").mkdir()
    other = make_indexed_video(tmp_path / "second camera" / "my 'film'.mp4", "24", 48)  # same name, other bytes
    assert tab.add_upload(str(other)).value == "my 'film' (2).mp4"  # kept apart: neither dropped nor written over
    assert tab.add_upload(str(video)).value == "my 'film'.mp4"  # the same bytes again are the same file
    assert (project.sources_dir / "my 'film' (2).mp4").read_bytes() == other.read_bytes()
    not_video = tmp_path / "fake.mp4"
    not_video.write_text("hello")
    with pytest.raises(gr.Error, match="not a readable video|not a video"):
        tab.add_upload(str(not_video))
    assert not (project.sources_dir / "fake.mp4").exists()

    times = tmp_path / "times.txt"
    times.write_text("0.5\n1.0 +0.5625 second\n3.9\n", encoding="utf-8")
    rows = tab.import_times("my 'film'.mp4", [], 9, False, str(times))
    assert [r[1] for r in rows] == [0.5, 1.0, 3.9] and rows[1][4] == "second"
    assert "overlaps cut 2" in rows[0][6] and "out of range" in rows[2][6] and rows[1][6] == "overlaps cut 1"
    rows = tab.delete_cut("my 'film'.mp4", rows, 9, False, 3)
    assert len(rows) == 2
    assert tab.load_cuts("my 'film'.mp4")[1].name == "second"  # saved on every change
    exported = Path(tab.export_times("my 'film'.mp4", rows))
    assert exported.read_text(encoding="utf-8").splitlines()[1:] == ["00:00:00.500",
                                                                     "00:00:01.000 00:00:01.562 second"]
    with pytest.raises(gr.Error, match="Cut 1"):
        tab.edit_table("my 'film'.mp4", [[1, "soon", None, 9, "", "", ""]], 9, False)
    rows = tab.edit_table("my 'film'.mp4", [[1, "00:00:02.000", None, 0, "", "", ""]], 9, False)
    assert rows[0][1:4] == [2.0, None, 9]
    status, listed = tab.export("my 'film'.mp4", rows, 9, False, "64x48", True, progress=lambda *a, **k: None)
    assert status.startswith("Exported 1 clip") and listed[0][0] == "my _film__000m02s000.mp4"
