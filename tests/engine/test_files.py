"""Atomic writes leave either the old file or the new one, never a partial file."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.core.ffmpeg import write_video
from engine.core.files import append_jsonl, atomic_path, atomic_write_text, read_jsonl, remove_stale_temps
from engine.core.layout import Project

REPO = Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------------ killed writers, durability, permissions

KILLED_WRITER = """
import os, signal, sys
from engine.core.files import atomic_dir, atomic_path
kind, target = sys.argv[1], sys.argv[2]
with (atomic_dir if kind == "dir" else atomic_path)(target) as tmp:
    if kind == "dir":
        (tmp / "lora.safetensors").write_bytes(b"half")
    else:
        tmp.write_bytes(b"half of a file")
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save: the temporary name stays behind
"""


def kill_a_writer(kind: str, target) -> None:
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target)], cwd=REPO)
    assert child.returncode == -signal.SIGKILL


def test_temps_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    epoch = tmp_path / "run" / "epoch1"
    kill_a_writer("file", epoch / "adapter_model.safetensors")
    kill_a_writer("dir", tmp_path / "run" / "state" / "step4")
    left = sorted(p.name for p in (tmp_path / "run").rglob(".*"))
    assert len(left) == 2 and all(".tmp" in name for name in left)
    with atomic_path(tmp_path / "run" / "run.toml") as live:  # a write in progress in a live process
        live.write_text("x")
        removed = remove_stale_temps(tmp_path / "run", recursive=True)
        assert sorted(p.name for p in removed) == left
        assert live.exists()
    assert not [p for p in (tmp_path / "run").rglob(".*")]
    assert not (epoch / "adapter_model.safetensors").exists() and not (tmp_path / "run" / "state" / "step4").exists()


def test_a_saved_state_is_synced_file_and_folder_before_it_counts(tmp_path, monkeypatch):
    import torch

    from engine.training.state import TrainingState, capture_rng_state, save_training_state

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    state = TrainingState(step=3, epoch=1, global_micro_batches=3, lora={"a": torch.ones(2)}, optimizer={},
                          rng=capture_rng_state(), info={})
    final = save_training_state(tmp_path / "state", state)
    names = [p.name for p in synced]
    for file in ("lora.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert file in names  # synced in the temporary folder, before the rename
    rename = names.index("state")  # the state root is synced after the rename into it
    assert any(p.name.startswith(".step3.") for p in synced[:rename])  # the folder itself, before it is renamed
    assert final.is_dir() and synced[-1] == tmp_path / "state"


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_saved_files_and_folders_follow_the_umask(tmp_path, umask):
    import torch

    from engine.generate.lora_files import save_lora
    from engine.training.state import TrainingState, capture_rng_state, save_training_state

    before = os.umask(umask)
    try:
        lora = save_lora({"blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 8),
                          "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 4)}, tmp_path / "epoch1", rank=4,
                         alpha=4)
        state = save_training_state(tmp_path / "state", TrainingState(
            step=1, epoch=1, global_micro_batches=1, lora={"a": torch.ones(2)}, optimizer={},
            rng=capture_rng_state(), info={}))
        text = atomic_write_text(tmp_path / "caption.txt", "a caption")
    finally:
        os.umask(before)
    for file in (lora, state / "lora.safetensors", state / "state.json", text):
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
    for folder in (state, lora.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


# ------------------------------------------------------------------------------------- uploads, numbered records

UPLOADS = REPO / "tests" / "fixtures" / "same-name-uploads"  # /work/shared/cases/same-name-uploads


def test_same_name_uploads_are_kept_apart_by_content(tmp_path):
    project = Project.open(tmp_path / "p")
    loras = project.root / "loras"
    first = project.add_upload(UPLOADS / "runA" / "adapter_model.safetensors", loras)
    second = project.add_upload(UPLOADS / "runB" / "adapter_model.safetensors", loras)
    assert first.name == "adapter_model.safetensors" and second.name == "adapter_model (2).safetensors"
    assert first.read_bytes() == (UPLOADS / "runA" / "adapter_model.safetensors").read_bytes()  # not written over
    assert second.read_bytes() == (UPLOADS / "runB" / "adapter_model.safetensors").read_bytes()
    assert project.add_upload(UPLOADS / "runB" / "adapter_model.safetensors", loras) == second  # same bytes: same file
    assert len(list(loras.iterdir())) == 2

    videos = []
    for shade in (40, 200):  # two phones' IMG_0001.mp4
        folder = tmp_path / f"phone {shade}"
        write_video((np.full((32, 32, 3), shade, np.uint8) for _ in range(5)), folder / "IMG_0001.mp4", fps=16)
        videos.append(project.add_upload(folder / "IMG_0001.mp4", project.sources_dir))
    assert [p.name for p in videos] == ["IMG_0001.mp4", "IMG_0001 (2).mp4"]
    assert [p.name for p in project.list_sources()] == ["IMG_0001 (2).mp4", "IMG_0001.mp4"]  # neither dropped


HISTORY_WRITER = """
import sys
from engine.captions.store import CaptionStore
store = CaptionStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.save("clip.mp4", f"{sys.argv[2]} {i}")
"""


def test_caption_history_ids_stay_unique_with_two_writers(tmp_path):
    write_video((np.zeros((32, 32, 3), np.uint8) for _ in range(5)), tmp_path / "clip.mp4", fps=16)
    writers = [subprocess.Popen([sys.executable, "-c", HISTORY_WRITER, str(tmp_path), name, "40"], cwd=REPO)
               for name in ("studio", "terminal")]
    assert [w.wait(120) for w in writers] == [0, 0]
    from engine.captions.store import CaptionStore

    ids = [record["id"] for record in CaptionStore(tmp_path).history("clip.mp4")]
    assert len(ids) == 80 and sorted(ids) == list(range(1, 81))
