"""The tiny BLIP-2 kit captions generated clips through the loader real models use; batch suggest and the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.captions.__main__ import main
from engine.captions.captioners import (
    Blip2Captioner,
    CaptionerOutOfMemory,
    CaptionerSettings,
    ClipDecodeError,
    caption_clip,
    read_clip_frames,
    suggest_captions,
)
from engine.captions.store import CaptionStore
from engine.core.ffmpeg import write_video
from engine.core.models import ModelFolderError

REPO = Path(__file__).resolve().parents[2]


def write_numbered_clip(path, frames=12, size=(64, 48)):
    """A clip whose frame i has brightness 20*i, so the frames read back can be identified."""
    return write_video([np.full((size[1], size[0], 3), 20 * i, np.uint8) for i in range(frames)], path, fps=8)


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
    return write_numbered_clip(tmp_path_factory.mktemp("clip") / "c.mp4").read_bytes()


@pytest.fixture(scope="module")
def captioner(tiny_models):
    captioner = Blip2Captioner(tiny_models.captioner, device="cpu", max_new_tokens=8)
    yield captioner
    captioner.unload()


@pytest.fixture
def clips(project, clip_bytes):
    for name in ("a.mp4", "b é.mp4", "c.mp4"):
        (project.clips_dir / name).write_bytes(clip_bytes)
    (project.clips_dir / "broken.mp4").write_bytes(b"this is not a video")
    return project.clips_dir


def test_read_clip_frames_first_middle_last(tmp_path):
    clip = write_numbered_clip(tmp_path / "n.mp4", frames=12)
    frames = read_clip_frames(clip, 3)
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    levels = [float(f.mean()) for f in frames]
    assert levels[0] < 10 and abs(levels[1] - 20 * 6) < 12 and abs(levels[2] - 220) < 12
    assert len(read_clip_frames(clip, 1)) == 1
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ClipDecodeError, match="bad.mp4"):
        read_clip_frames(tmp_path / "bad.mp4")


def test_tiny_blip2_captions_a_generated_clip(captioner, tmp_path):
    clip = write_numbered_clip(tmp_path / "clip.mp4")
    text = caption_clip(captioner, clip, CaptionerSettings(frames_per_clip=3))
    assert captioner.loaded and captioner._model.dtype == torch.float32
    assert type(captioner._model).__name__ == "Blip2ForConditionalGeneration"
    assert isinstance(text, str) and text.strip()
    with_prompt = captioner.caption_images(read_clip_frames(clip, 2), prompt="a video of")
    assert len(with_prompt) == 2 and all(isinstance(t, str) for t in with_prompt)


def test_unload_then_reload(tiny_models):
    captioner = Blip2Captioner(tiny_models.captioner, device="cpu", max_new_tokens=4)
    frame = np.zeros((32, 32, 3), np.uint8)
    first = captioner.caption_images([frame])
    captioner.unload()
    assert not captioner.loaded
    assert captioner.caption_images([frame]) == first and captioner.loaded


def test_suggest_all_missing_skips_captioned_and_reports_broken(captioner, clips):
    store = CaptionStore(clips)
    store.save("a.mp4", "a human caption")
    progress, stops = [], iter([False, False, False, True])
    report = suggest_captions(store, captioner, settings=CaptionerSettings(frames_per_clip=3, batch_size=3),
                              on_progress=lambda f, m: progress.append(f), should_stop=lambda: next(stops))
    assert report.skipped == ["a.mp4"]
    assert "broken.mp4" in report.failed and "broken.mp4" in report.failed["broken.mp4"]
    assert sorted(report.suggested) == ["b é.mp4", "c.mp4"] and not report.stopped
    assert progress[0] == 0.0 and progress[-1] == 1.0
    assert store.read("a.mp4").text == "a human caption"  # never replaced
    assert store.read("c.mp4").text == ""  # suggestions are not captions until accepted
    assert store.info("c.mp4").status == "suggested" and store.suggestion("c.mp4").text == report.suggested["c.mp4"]


def test_suggest_stops_when_asked(captioner, clips):
    report = suggest_captions(CaptionStore(clips), captioner, should_stop=lambda: True)
    assert report.stopped and report.suggested == {}


def test_out_of_memory_names_the_settings(captioner, tmp_path, monkeypatch):
    captioner.load()

    def out_of_memory(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(captioner._model, "generate", out_of_memory)
    with pytest.raises(CaptionerOutOfMemory, match="batch size.*frames per clip.*CPU"):
        captioner.caption_images([np.zeros((32, 32, 3), np.uint8)])


def test_not_blip2_folder_is_a_clear_error(tiny_models):
    with pytest.raises(ModelFolderError, match="not BLIP-2"):
        Blip2Captioner(Path(tiny_models.wan) / "image_encoder", device="cpu").load()


def test_cli_suggest_does_not_overwrite_by_default(tiny_models, clips, capsys):
    store = CaptionStore(clips)
    store.save("a.mp4", "a human caption")
    code = main(["suggest", str(clips), "--model", tiny_models.captioner, "--frames", "2", "--device", "cpu",
                 "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert code == 1 and "broken.mp4" in out.err  # one clip failed to decode: reported, the rest done
    assert store.read("a.mp4").text == "a human caption"
    written = store.read("c.mp4").text
    assert written and store.info("c.mp4").status == "suggested"
    assert "1 clip(s) already captioned" in out.out
    code = main(["suggest", str(clips), "--model", tiny_models.captioner, "--overwrite", "--device", "cpu",
                 "--max-new-tokens", "6"])
    assert store.read("a.mp4").text != "a human caption"
    assert store.undo("a.mp4") == "a human caption"  # overwriting kept the old caption in history


def test_cli_apply_style_dry_run_and_export(tmp_path, clips, capsys):
    store = CaptionStore(clips)
    store.save("a.mp4", "Goku runs, anime")
    rules = tmp_path / "rules.toml"
    rules.write_text('trigger = "sks"\n[replacements]\nGoku = "a warrior"\n', encoding="utf-8")
    assert main(["apply-style", str(clips), "--rules", str(rules), "--dry-run"]) == 0
    assert "[-Goku-]{+sks, a warrior+} runs" in capsys.readouterr().out
    assert store.read("a.mp4").text == "Goku runs, anime"
    assert main(["apply-style", str(clips), "--rules", str(rules)]) == 0
    assert store.read("a.mp4").text == "sks, a warrior runs, anime"
    assert main(["export", str(clips), str(tmp_path / "all.jsonl")]) == 0
    assert "sks, a warrior runs" in (tmp_path / "all.jsonl").read_text(encoding="utf-8")
    assert main(["apply-style", str(clips), "--rules", str(tmp_path / "none.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_entry_point_runs_as_a_module(clips):
    out = subprocess.run([sys.executable, "-m", "engine.captions", "check", str(clips)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "a.mp4\tmissing" in out.stdout and "broken.mp4\tmissing" in out.stdout
