"""Atomic writes leave either the old file or the new one, never a partial file."""

import numpy as np
import pytest

from engine.core.ffmpeg import write_video
from engine.core.files import append_jsonl, atomic_path, atomic_write_text, read_jsonl
from engine.core.layout import Project


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "caption é.txt"
    atomic_write_text(target, "old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_jsonl_skips_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 1})
    with open(log, "a") as f:
        f.write('{"step": 2, "lo')
    assert read_jsonl(log) == [{"step": 1}]


def test_write_video_leaves_nothing_when_frames_fail(tmp_path):
    def frames():
        yield np.zeros((32, 32, 3), np.uint8)
        raise RuntimeError("decoder broke")

    with pytest.raises(RuntimeError, match="decoder broke"):
        write_video(frames(), tmp_path / "clip.mp4", fps=16)
    assert list(tmp_path.iterdir()) == []


def test_hidden_in_progress_files_are_not_clips(tmp_path):
    project = Project.open(tmp_path / "p")
    write_video((np.full((32, 32, 3), i, np.uint8) for i in range(5)), project.clips_dir / "a.mp4", fps=16)
    (project.clips_dir / ".a.mp4.part.mp4").write_bytes(b"partial")
    assert [p.name for p in project.list_clips()] == ["a.mp4"]
