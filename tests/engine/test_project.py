"""Project layout: created on demand, safe with odd paths, settings round-trip, demo project material."""

import cv2
import pytest

from engine.core.layout import Project, ProjectSettings, checked_name


def test_layout_created_with_odd_path(tmp_path):
    root = tmp_path / "a \"quoted\" 'name' 日本"
    p = Project.open(root)
    for d in (p.sources_dir, p.clips_dir, p.cache_dir, p.runs_dir, p.outputs_dir):
        assert d.is_dir() and d.parent == p.root
    assert p.name == root.name
    s = p.settings()
    s.clip_frames = 33
    p.save_settings(s)
    assert Project.open(root).settings().clip_frames == 33
    assert isinstance(s, ProjectSettings)


def test_missing_project_without_create(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Project.open(tmp_path / "missing", create=False)


def test_run_names_are_validated(tmp_path):
    p = Project.open(tmp_path / "p")
    assert p.run_dir("run 1").parent == p.runs_dir
    for bad in ("../x", "a/b", "..", "../../..", "/etc", "a\\b", ".hidden", "", " ", "a\nb", "x" * 256):
        with pytest.raises(ValueError, match="Run name"):
            p.run_dir(bad)
    assert p.new_run_name() != "" and not (p.runs_dir / p.new_run_name()).exists()


def test_names_from_people_and_browsers_are_checked_in_one_place(tmp_path):
    p = Project.open(tmp_path / "p")
    for fine in ("it's \"run\" 2 é 日本", "IMG_0001.mp4", "a..b"):  # quotes, non-ASCII, inner dots are fine
        assert checked_name(fine, "Name") == fine
        assert p.clip_file(fine).parent == p.clips_dir and p.source_file(fine).parent == p.sources_dir
    for bad, why in (("../../..", "path separator"), ("/abs/path", "path separator"), ("..", "starts with '.'"),
                     (".part.mp4", "starts with '.'"), ("a\x00b", "control character"), ("", "empty")):
        with pytest.raises(ValueError, match=why):
            checked_name(bad, "Name")
        with pytest.raises(ValueError, match="Clip name"):
            p.clip_file(bad)
        with pytest.raises(ValueError, match="Source video name"):
            p.source_file(bad)
    upload = tmp_path / "up" / ".hidden.mp4"
    upload.parent.mkdir()
    upload.write_bytes(b"x")
    with pytest.raises(ValueError, match="Uploaded file name"):
        p.add_upload(upload, p.sources_dir)
    assert list(p.sources_dir.iterdir()) == []


def test_demo_project_has_a_source_with_motion_and_scene_changes(demo_home):
    p = Project.open(demo_home / "demo", create=False)
    (source,) = p.list_sources()
    cap = cv2.VideoCapture(str(source))
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = cap.get(cv2.CAP_PROP_FPS)
    assert 20 <= frames / fps <= 40
    diffs, prev = [], None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        small = cv2.resize(frame, (64, 36)).astype(float)
        if prev is not None:
            diffs.append(abs(small - prev).mean())
        prev = small
    assert sum(d > 40 for d in diffs) >= 3, "expected at least three hard scene cuts"
    assert sorted(diffs)[len(diffs) // 2] > 0.5, "expected real motion within scenes"


def test_demo_project_has_captioned_clips_ready_for_training(demo_home):
    from engine.clips.cut import count_frames
    from engine.demo import DEMO_CLIPS

    p = Project.open(demo_home / "demo", create=False)
    clips = p.list_clips()
    assert len(clips) == len(DEMO_CLIPS)
    settings = p.settings()
    for clip in clips:
        assert count_frames(clip) == settings.clip_frames
        caption = p.caption_path(clip).read_text(encoding="utf-8").strip()
        assert caption and "," in caption
        cap = cv2.VideoCapture(str(clip))
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (
            settings.clip_width, settings.clip_height)
