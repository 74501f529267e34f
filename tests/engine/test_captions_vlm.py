"""The video-language captioner (Qwen2.5-VL through transformers): the tiny kit of the real class loads through the
loader real folders go through, watches a clip at the chosen frame rate, and plugs into suggest and the CLI."""

import numpy as np
import pytest

from engine.captions.__main__ import main
from engine.captions.captioners import suggest_captions
from engine.captions.store import CaptionStore
from engine.captions.style import StyleRules, save_style_rules
from engine.captions.vlm import (
    ClipVideo,
    ClipVideoProcessor,
    VideoCaptionerError,
    VideoLanguageCaptioner,
    check_vlm_folder,
    open_captioner,
    read_clip_video,
)
from engine.core.ffmpeg import write_video
from engine.core.layout import Project

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numbered_clip(path, frames=81, fps=16.0, size=(64, 48)):
    """Frame i is filled with brightness 3*i, so sampled frames can be told apart."""
    return write_video([np.full((size[1], size[0], 3), 3 * i, np.uint8) for i in range(frames)], path, fps=fps)


@pytest.fixture(scope="module")
def captioner(tiny_models):
    return VideoLanguageCaptioner(tiny_models.video_captioner, device="cpu", max_new_tokens=6)


def test_reads_the_clip_at_the_chosen_frame_rate(tmp_path):
    clip = numbered_clip(tmp_path / "c.mp4")
    video = read_clip_video(clip, fps=4.0)
    assert video.frames.shape[0] == 21 and video.fps == 4.0  # 81 frames at 16 fps = 5.06 s -> t = 0, 0.25, ... 5.0
    brightness = video.frames.reshape(21, -1).mean(axis=1) / 3
    assert np.allclose(brightness, np.arange(0, 81, 4), atol=1.5)  # frame k/4 s is source frame 4k
    with pytest.raises(VideoCaptionerError, match="frame rate"):
        read_clip_video(clip, fps=0)


def test_patches_follow_qwen2_vl_video_layout():
    """Patch rows run over (t, h-block, w-block, h-in-merge, w-in-merge); each row holds (C, t-in-pair, y, x)."""
    proc = ClipVideoProcessor({"patch_size": 2, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 16,
                               "max_pixels": 64, "image_mean": [0, 0, 0], "image_std": [1, 1, 1],
                               "rescale_factor": 1.0})
    t, h, w = 3, 8, 8  # 3 frames: the last is repeated to fill the second temporal pair
    frames = np.zeros((t, h, w, 3), np.uint8)
    for f in range(t):
        frames[f, :, :, 0] = f  # channel 0: frame index
        frames[f, :, :, 1] = np.arange(h)[:, None]  # channel 1: row
        frames[f, :, :, 2] = np.arange(w)[None, :]  # channel 2: column
    patches, grid = proc(frames)
    assert grid == (2, 4, 4) and patches.shape == (2 * 4 * 4, 3 * 2 * 2 * 2)
    row = patches.reshape(2, 2, 2, 2, 2, 3, 2, 2, 2)  # t, hb, wb, mh, mw, C, tp, py, px
    # second temporal pair, h-block 1, w-block 0, in-merge (1, 1): rows 6..7, columns 2..3; frames 2 and 2 again
    cell = row[1, 1, 0, 1, 1]
    assert (cell[0] == 2).all()
    assert (cell[1, :, 0, :] == 6).all() and (cell[1, :, 1, :] == 7).all()
    assert (cell[2, :, :, 0] == 2).all() and (cell[2, :, :, 1] == 3).all()


def test_model_inputs_hold_one_video_token_per_merged_patch_group(captioner):
    video = ClipVideo("c", np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), dtype=np.uint8), 4.0)
    inputs = captioner.model_inputs(video)
    grid = inputs["video_grid_thw"][0].tolist()
    video_tokens = int((inputs["mm_token_type_ids"] == 2).sum())
    assert video_tokens == grid[0] * grid[1] * grid[2] // 4
    assert grid[0] == 5  # 9 frames -> 5 temporal pairs
    assert float(inputs["second_per_grid_ts"][0]) == pytest.approx(2 / 4.0)
    assert inputs["pixel_values_videos"].shape[0] == grid[0] * grid[1] * grid[2]


def test_folder_checks_name_the_problem(tiny_models, tmp_path):
    check_vlm_folder(tiny_models.video_captioner)
    with pytest.raises(VideoCaptionerError, match="blip"):
        check_vlm_folder(tiny_models.captioner)
    with pytest.raises(VideoCaptionerError, match="config.json"):
        check_vlm_folder(tmp_path)
    with pytest.raises(VideoCaptionerError, match="CUDA"):
        VideoLanguageCaptioner(tiny_models.video_captioner, device="cpu", memory_mode="4bit")
    with pytest.raises(VideoCaptionerError, match="instruction"):
        VideoLanguageCaptioner(tiny_models.video_captioner, device="cpu", instruction="  ")
    assert type(open_captioner(tiny_models.video_captioner, "cpu")).__name__ == "VideoLanguageCaptioner"
    assert type(open_captioner(tiny_models.captioner, "cpu")).__name__ == "Blip2Captioner"


def test_suggestions_pass_through_the_style_rules(captioner, tmp_path):
    clips = tmp_path / "clips"
    numbered_clip(clips / "a.mp4", frames=17)
    numbered_clip(clips / "b.mp4", frames=17)
    (clips / "b.txt").write_text("kept as it is", encoding="utf-8")
    store = CaptionStore(clips)
    steps = []
    report = suggest_captions(store, captioner, rules=StyleRules(trigger="zq style"),
                              on_progress=lambda f, m: steps.append(f))
    assert list(report.suggested) == ["a.mp4"] and report.skipped == ["b.mp4"]
    assert report.suggested["a.mp4"].startswith("zq style")
    assert store.read("a.mp4").text == ""  # a suggestion waits for accept; it is not the caption
    assert steps[-1] == 1.0
    captioner.unload()
    assert not captioner.loaded


def test_command_line_uses_the_projects_captioner_settings(tiny_models, tmp_path, capsys):
    project = Project.open(tmp_path / "p", captioner_model=tiny_models.video_captioner,
                           caption_instruction="Describe only the camera.")
    numbered_clip(project.clips_dir / "a.mp4", frames=17)
    save_style_rules(StyleRules(trigger="zq style"), project.style_rules_file)
    assert main(["suggest", str(project.clips_dir), "--device", "cpu", "--max-new-tokens", "4",
                 "--video-fps", "2"]) == 0
    written = (project.clips_dir / "a.txt").read_text(encoding="utf-8")
    assert written.startswith("zq style") and "a.mp4: zq style" in capsys.readouterr().out
    assert main(["suggest", str(project.clips_dir), "--overwrite", "--device", "cpu", "--memory-mode", "8bit"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
