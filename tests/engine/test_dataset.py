"""Dataset scanning, buckets, and caching that matches what WanImageToVideoPipeline computes itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.core.models
from engine.core.ffmpeg import write_video
from engine.training.cache import CachedDataset, CachedItem, CachingStopped, cache_dataset
from engine.training.dataset import DatasetError, fit_frame, frame_windows, read_item_frames, scan_dataset, size_buckets
from engine.training.form import apply_overrides
from engine.training.schema import DatasetConfig, DirectoryConfig

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def moving_frames(count: int, width: int = 64, height: int = 48, seed: int = 0) -> list[np.ndarray]:
    """A bright square sliding over a coloured gradient: real motion, smooth enough for H.264 at small sizes."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, int(rng.integers(0, 255)))], -1)
    frames = []
    for i in range(count):
        frame = base.astype(np.uint8).copy()
        x = (i * 3) % max(1, width - 12)
        frame[10:22, x:x + 12] = 255
        frames.append(frame)
    return frames


def make_clip(folder, name: str, frames: int = 17, size=(64, 48), fps: float = 16.0, caption: str | None = "a "
              "bright square slides right, static camera", seed: int = 0):
    path = write_video(moving_frames(frames, *size, seed=seed), folder / f"{name}.mp4", fps=fps)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def dataset_for(folder, **overrides) -> DatasetConfig:
    """64x48 clips in a 17-frame bucket (scan tests)."""
    cfg = DatasetConfig(resolutions=[[64, 48]], ar_buckets=[[64, 48]], frame_buckets=[17],
                        directory=[DirectoryConfig(path=str(folder))])
    return apply_overrides(cfg, overrides) if overrides else cfg


# ------------------------------------------------------------------------------------------ scan and buckets

def test_scan_flags_each_problem(tmp_path):
    clips = tmp_path / "clips é"
    clips.mkdir()
    make_clip(clips, "good")
    make_clip(clips, "no caption", caption=None)
    make_clip(clips, "empty caption", caption="  \n")
    make_clip(clips, "too short", frames=9)
    make_clip(clips, "twenty frames", frames=20)
    make_clip(clips, "odd size", size=(70, 42))
    make_clip(clips, "film rate", frames=36, fps=24.0)
    (clips / "broken.mp4").write_bytes(b"this is not a video at all" * 10)
    (clips / "broken.txt").write_text("words")
    report = scan_dataset(dataset_for(clips))

    errors = {issue.file.name: issue.message for issue in report.errors}
    warnings = [(issue.file.name, issue.message) for issue in report.warnings]
    assert set(errors) == {"no caption.mp4", "too short.mp4", "broken.mp4"}, report.summary()
    assert "no caption file" in errors["no caption.mp4"]
    assert "9 frames" in errors["too short.mp4"] and "17" in errors["too short.mp4"]
    assert "cannot be read" in errors["broken.mp4"] or "decoded" in errors["broken.mp4"]
    assert any(f == "empty caption.txt" and "empty caption" in m for f, m in warnings)
    assert any(f == "twenty frames.mp4" and "not 4k+1" in m for f, m in warnings)
    assert any(f == "odd size.mp4" and "multiple of 16" in m for f, m in warnings)
    assert any(f == "film rate.mp4" and "resampled to 16 fps (24 frames)" in m for f, m in warnings)
    assert not any(f == "good.mp4" for f, _ in warnings)
    assert not report.ok
    usable = {item.clip.path.name for item in report.items}
    assert usable == {"good.mp4", "empty caption.mp4", "twenty frames.mp4", "odd size.mp4", "film rate.mp4"}
    assert all(item.bucket == (17, 48, 64) for item in report.items)
    good = next(c for c in report.clips if c.path.name == "good.mp4")
    assert (good.wan_frames, good.width, good.height) == (17, 64, 48) and good.caption.startswith("a bright")
    with pytest.raises(DatasetError, match="too short.mp4"):
        cache_dataset(dataset_for(clips), "unused", tmp_path / "cache")


def test_missing_and_empty_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = DatasetConfig(resolutions=[64], frame_buckets=[17], directory=[
        DirectoryConfig(path=str(tmp_path / "nowhere")), DirectoryConfig(path=str(tmp_path / "empty"))])
    messages = [issue.message for issue in scan_dataset(cfg).errors]
    assert any("not found" in m for m in messages) and any("no video clips" in m for m in messages)


def test_size_buckets_follow_diffusion_pipe_semantics():
    settings = dict(resolutions=[512], enable_ar_bucket=True, min_ar=0.5, max_ar=2.0, num_ar_buckets=7,
                    ar_buckets=None)
    (height, width), = size_buckets(settings, 1920, 1080)
    assert height % 16 == 0 and width % 16 == 0 and width > height
    assert abs(height * width - 512 * 512) / (512 * 512) < 0.05  # same pixel budget as 512 x 512
    assert size_buckets(settings, 1000, 1000) == [(512, 512)]
    assert size_buckets({**settings, "enable_ar_bucket": False}, 1920, 1080) == [(512, 512)]
    exact = {**settings, "resolutions": [[832, 480], 256], "ar_buckets": [[832, 480], [480, 832]]}
    assert size_buckets(exact, 1280, 720) == [(480, 832), (192, 336)]  # 480p, then 256^2 at 832:480
    assert size_buckets(exact, 720, 1280)[0] == (832, 480)


def test_frame_windows():
    assert frame_windows(90, [17, 33, 81], "single_beginning") == [(81, 0)]
    assert frame_windows(90, [17, 33, 81], "single_middle") == [(81, 4)]
    assert frame_windows(40, [33], "multiple_overlapping") == [(33, 0), (33, 7)]
    assert frame_windows(80, [81], "single_beginning") == []  # a 5.0 s clip misses the 81-frame bucket
    assert frame_windows(40, [1, 57], "single_beginning") == []  # 1 is the image bucket: never a video's
    assert frame_windows(40, [1, 33, 57], "multiple_overlapping") == [(33, 0), (33, 7)]


def test_a_video_shorter_than_every_video_bucket_is_an_error_not_a_still(tmp_path):
    """Field case short-clip-vs-buckets: a 24 fps, 60-frame clip (40 frames at 16 fps) with frame_buckets [1, 57]
    used to land in bucket 1 and train as one still frame with no error."""
    clips = tmp_path / "clips"
    shutil.copytree(CASES / "short-clip-vs-buckets", clips)
    make_clip(clips, "sixteen", frames=64)  # the case's 16 fps, 64-frame clip against [1, 65]

    def dataset(buckets: list[int]) -> DatasetConfig:
        return DatasetConfig(resolutions=[64], frame_buckets=buckets, directory=[DirectoryConfig(path=str(clips))])

    for buckets, shortest in [([1, 57], 57), ([1, 65], 65)]:
        report = scan_dataset(dataset(buckets))
        errors = {issue.file.name: issue.message for issue in report.errors}
        assert all(item.bucket[0] > 1 for item in report.items), report.summary()
        assert "40 frames at 16 fps (2.5 s)" in errors["v24_60f.mp4"] and f"({shortest})" in errors["v24_60f.mp4"]
        if shortest == 65:
            assert "64 frames at 16 fps (4 s)" in errors["sixteen.mp4"] and not report.items
        with pytest.raises(DatasetError, match="v24_60f.mp4: 40 frames"):
            cache_dataset(dataset(buckets), "unused", tmp_path / "cache")
    report = scan_dataset(dataset([33]))
    assert report.ok and {(i.clip.path.name, i.bucket[0]) for i in report.items} == {("v24_60f.mp4", 33),
                                                                                       ("sixteen.mp4", 33)}
    only_images = scan_dataset(dataset([1]))
    assert not only_images.items and all("no video bucket" in issue.message for issue in only_images.errors)


def test_one_caption_reader_names_non_utf8_captions_and_drops_the_mark(tmp_path):
    """Field case non-utf8-captions: a Windows-1252 caption ended training with a bare UnicodeDecodeError; a caption
    saved with a byte-order mark must train without it. The dataset check, the trainer's caching and the Captions
    tab read captions alike."""
    from engine.captions.store import CaptionStore

    clips = tmp_path / "clips"
    shutil.copytree(CASES / "non-utf8-captions", clips)
    cfg = DatasetConfig(resolutions=[64], frame_buckets=[17], directory=[DirectoryConfig(path=str(clips))])
    report = scan_dataset(cfg)
    (issue,) = report.errors
    assert issue.file.name == "a_quote.txt" and "not UTF-8" in issue.message and "Captions tab" in issue.message
    (clip,) = report.clips
    assert clip.caption == "sks motion, a turn" == CaptionStore(clips).read("b_bom.mp4").text
    with pytest.raises(DatasetError, match="a_quote.txt.*not UTF-8"):
        cache_dataset(cfg, "unused", tmp_path / "cache")
    shown = CaptionStore(clips).read("a_quote.mp4")
    assert not shown.readable and "byte 22" in shown.message


def test_fit_frame_covers_and_centre_crops():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 50:150] = 255  # white centre half
    out = fit_frame(frame, 64, 64)
    assert out.shape == (64, 64, 3) and out[:, 8:56].min() > 200


def test_multiple_resolutions_and_repeats(tmp_path):
    make_clip(tmp_path, "one", frames=40)
    cfg = dataset_for(tmp_path, resolutions="[[64, 48], 32]", frame_buckets="[17, 33]")
    cfg.directory[0].num_repeats = 3
    report = scan_dataset(cfg, video_clip_mode="multiple_overlapping")
    assert sorted({item.bucket for item in report.items}) == [(33, 32, 32), (33, 48, 64)]
    assert [item.start for item in report.items] == [0, 7, 0, 7]
    assert report.bucket_counts() == {(33, 32, 32): 6, (33, 48, 64): 6}
    cfg.directory[0].num_repeats, cfg.num_repeats = None, 2  # the dataset's num_repeats where a folder sets none
    assert scan_dataset(cfg, video_clip_mode="multiple_overlapping").bucket_counts() == {(33, 32, 32): 4,
                                                                                         (33, 48, 64): 4}


def test_read_item_frames_resamples_to_16_fps(tmp_path):
    make_clip(tmp_path, "film", frames=36, fps=24.0)
    report = scan_dataset(dataset_for(tmp_path))
    frames = read_item_frames(report.items[0])
    assert frames.shape == (17, 48, 64, 3) and frames.dtype == np.uint8
    source = moving_frames(36)
    # 16-fps frame i shows the 24-fps frame on screen at i/16 s: index floor(i * 1.5)
    for i in (0, 5, 16):
        assert np.abs(frames[i].astype(int) - source[int(i * 1.5)]).mean() < 6


# ------------------------------------------------------------------------------------------------- caching
# Caching tests use 9-frame 32x32 clips: the VAE's 3D convolutions dominate their run time on a CPU.
SMALL = dict(frames=9, size=(32, 32))


def small_dataset_for(folder) -> DatasetConfig:
    return DatasetConfig(resolutions=[32], enable_ar_bucket=False, frame_buckets=[9],
                         directory=[DirectoryConfig(path=str(folder))])


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_models):
    """Two clips cached with the tiny kit, and a counter of encoder loads."""
    root = tmp_path_factory.mktemp("cached data")
    clips = root / "clips"
    clips.mkdir()
    make_clip(clips, "a", seed=1, **SMALL)
    make_clip(clips, "b", seed=2, caption="a square moves, camera still", **SMALL)
    cfg = small_dataset_for(clips)
    progress: list[tuple[float, str]] = []
    data = cache_dataset(cfg, tiny_models.wan, root / "cache", on_progress=lambda f, m: progress.append((f, m)))
    return cfg, data, root, progress


def test_cache_layout_and_progress(cached):
    cfg, data, root, progress = cached
    assert len(data.items) == 2 and data.missing_files() == []
    assert all(isinstance(i, CachedItem) and i.bucket == (9, 32, 32) and i.repeats == 1 for i in data.items)
    assert [f for f, _ in progress] == sorted(f for f, _ in progress) and progress[-1][0] == 1.0
    tensors = data.load(0)
    assert tensors["latents"].shape == (16, 3, 4, 4) and tensors["condition"].shape == (20, 3, 4, 4)
    assert tensors["text_embeds"].shape[0] == 512 and tensors["image_embeds"].ndim == 2
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert len(data.fingerprint) == 16


def test_cached_tensors_equal_what_the_pipeline_computes(cached, tiny_models):
    cfg, data, root, _ = cached
    pipe = engine.core.models.load_wan_pipeline(tiny_models.wan, torch_dtype=torch.float32)
    item = scan_dataset(cfg).items[0]
    frames = read_item_frames(item)
    got = data.load(0)
    frames_count, height, width = item.bucket

    prompt_embeds, _ = pipe.encode_prompt(item.clip.caption, do_classifier_free_guidance=False,
                                          max_sequence_length=512, device="cpu")
    torch.testing.assert_close(got["text_embeds"], prompt_embeds[0], rtol=0, atol=1e-6)
    length = len(pipe.tokenizer(item.clip.caption).input_ids)
    assert got["text_embeds"][:length].abs().sum(-1).min() > 0 and got["text_embeds"][length:].abs().max() == 0

    first = Image.fromarray(frames[0])
    torch.testing.assert_close(got["image_embeds"], pipe.encode_image(first, device="cpu")[0], rtol=0, atol=1e-6)

    image = pipe.video_processor.preprocess(first, height=height, width=width).to("cpu", torch.float32)
    _, condition = pipe.prepare_latents(image, 1, 16, height, width, frames_count, torch.float32, "cpu",
                                        torch.Generator().manual_seed(0))
    torch.testing.assert_close(got["condition"], condition[0], rtol=0, atol=1e-6)
    assert got["condition"][:4, 0].min() == 1 and got["condition"][:4, 1:].max() == 0  # the first-frame mask

    video = pipe.video_processor.preprocess_video([Image.fromarray(f) for f in frames], height=height, width=width)
    z = pipe.vae.encode(video.to(torch.float32)).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(got["latents"], ((z - mean) / std)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got["latents"], data.load(1)["latents"])  # the two clips differ


def test_a_training_step_feeds_the_transformer_what_the_pipeline_feeds_it(cached, tiny_models):
    """At one noise level the transformer call of our training step and of WanImageToVideoPipeline (same first frame,
    caption and noisy latents) get the same inputs, and our target is the velocity diffusers' flow-matching scheduler
    steps along: the pieces are tested above, this pins how they are put together (channel order, timestep scale,
    flow shift, x_t)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engine.training.objective import TimestepSampling, flow_matching_loss, micro_batch_generator, stack_items

    cfg, data, _, _ = cached
    pipe = engine.core.models.load_wan_pipeline(tiny_models.wan, torch_dtype=torch.float32)
    calls: list[dict] = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    batch = stack_items([data.load(0)], torch.device("cpu"))
    with torch.no_grad():
        flow_matching_loss(pipe.transformer, batch, timesteps_cfg=TimestepSampling("logit_normal", 3.0),
                           generator=micro_batch_generator(0, 0))
    ours = calls.pop()

    # The same draws, unshifted: the scheduler applies the flow shift itself and noises the latents its own way.
    generator = micro_batch_generator(0, 0)
    sigma = TimestepSampling("logit_normal", 1.0).sample(1, generator)
    noise = torch.randn(batch["latents"].shape, generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda steps, device=None: set_timesteps(device=device, sigmas=sigma.tolist())
    scheduler.set_timesteps(1)
    noisy = scheduler.scale_noise(batch["latents"], scheduler.timesteps, noise)
    pipe.scheduler = scheduler
    item = scan_dataset(cfg).items[0]
    frames_count, height, width = item.bucket
    with torch.no_grad():
        pipe(image=Image.fromarray(read_item_frames(item)[0]), prompt=item.clip.caption, height=height, width=width,
             num_frames=frames_count, num_inference_steps=1, guidance_scale=1.0, latents=noisy, output_type="latent")
    theirs = calls.pop()

    tensors = {key for key, value in theirs.items() if torch.is_tensor(value)}
    assert tensors == {key for key, value in ours.items() if torch.is_tensor(value)} == {
        "hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"}
    for key in tensors:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    scheduler.set_timesteps(1)
    denoised = scheduler.step(noise - batch["latents"], scheduler.timesteps[0], noisy, return_dict=False)[0]
    torch.testing.assert_close(denoised, batch["latents"], rtol=1e-5, atol=1e-5)


def test_changed_caption_reencodes_only_its_text(cached, tiny_models, monkeypatch):
    cfg, data, root, _ = cached
    loads: list[str] = []
    for name in ("load_wan_vae", "load_wan_image_encoder", "load_wan_text_encoder"):
        original = getattr(engine.core.models, name)
        monkeypatch.setattr(engine.core.models, name, lambda *a, _o=original, _n=name, **k: (loads.append(_n), _o(
            *a, **k))[1])
    before = {f: f.stat().st_mtime_ns for f in (root / "cache").rglob("*.safetensors")}

    again = cache_dataset(cfg, tiny_models.wan, root / "cache")
    assert loads == [] and [i.text_file for i in again.items] == [i.text_file for i in data.items]

    caption = data.items[1].clip.with_suffix(".txt")
    caption.write_text("a square moves quickly, camera still", encoding="utf-8")
    changed = cache_dataset(cfg, tiny_models.wan, root / "cache")
    assert loads == ["load_wan_text_encoder"]
    assert changed.items[0].text_file == data.items[0].text_file
    assert changed.items[1].text_file != data.items[1].text_file
    assert [i.latent_file for i in changed.items] == [i.latent_file for i in data.items]
    after = {f: f.stat().st_mtime_ns for f in (root / "cache").rglob("*.safetensors")}
    assert set(after) - set(before) == {changed.items[1].text_file}
    assert all(after[f] == before[f] for f in before)  # nothing rewritten
    assert not torch.equal(changed.load(1)["text_embeds"], data.load(1)["text_embeds"])


def test_ranks_split_the_work_and_stop_is_honoured(tmp_path, tiny_models):
    for i in range(3):
        make_clip(tmp_path, f"clip {i}", seed=i, caption=f"square {i} slides", **SMALL)
    cfg = small_dataset_for(tmp_path)
    with pytest.raises(CachingStopped):
        cache_dataset(cfg, tiny_models.wan, tmp_path / "cache", should_stop=lambda: True)
    first = cache_dataset(cfg, tiny_models.wan, tmp_path / "cache", rank=0, world_size=2)
    missing = first.missing_files()
    assert 0 < len(missing) < 6
    second = cache_dataset(cfg, tiny_models.wan, tmp_path / "cache", rank=1, world_size=2)
    assert second.missing_files() == [] and [i.latent_file for i in second.items] == [
        i.latent_file for i in first.items]
    assert all(second.load(i)["latents"].shape == (16, 3, 4, 4) for i in range(3))


def test_batch_order_is_deterministic_bucketed_and_sharded(tmp_path):
    items = [CachedItem(tmp_path / f"{i}.mp4", (17, 48, 64) if i < 5 else (33, 32, 32), tmp_path / f"l{i}",
                        tmp_path / f"t{i}", repeats=2 if i == 0 else 1) for i in range(8)]
    data = CachedDataset(items, tmp_path)
    order = data.batch_order(epoch=0, seed=1, batch_size=2)
    assert order == data.batch_order(epoch=0, seed=1, batch_size=2)
    assert order != data.batch_order(epoch=1, seed=1, batch_size=2)
    flat = sorted(i for batch in order for i in batch)
    assert flat == [0, 0, 1, 2, 3, 4, 5, 6, 7]  # every item, item 0 twice
    assert all(len({items[i].bucket for i in batch}) == 1 for batch in order)
    shards = [data.batch_order(epoch=3, seed=1, batch_size=1, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5  # 9 examples padded to 10 so ranks step together
    assert sorted({i for s in shards for b in s for i in b}) == list(range(8))
