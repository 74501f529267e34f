"""diffusion-pipe configs through the real paths: every key diffusion-pipe reads imports, round-trips and is named when
the studio does not use it; the field cases (tests/fixtures/cases/) import, export and keep their meaning."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

from engine.training.config import load_dataset_config, load_run_config, save_dataset_config, save_run_config
from engine.training.form import apply_overrides
from engine.training.interop import differences_in_diffusion_pipe, export_for_diffusion_pipe, notices
from engine.training.optim import learning_rate
from engine.training.schema import ConfigError, DatasetConfig, DirectoryConfig, RunConfig
from tests.engine.test_config import DIFFUSION_PIPE_DATASET, DIFFUSION_PIPE_DIRECTORY, DIFFUSION_PIPE_RUN

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
REPO = Path(__file__).resolve().parents[2]


def _raw(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _case(name: str, folder: Path, **places: str) -> Path:
    """A copy of a field case in `folder`, with TINY_WAN_KIT, CLIPS_DIR and OUTPUT_DIR replaced by `places`."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in (CASES / name).iterdir():
        text = source.read_text(encoding="utf-8")
        for placeholder, value in places.items():
            text = text.replace(placeholder, value)
        (folder / source.name).write_text(text, encoding="utf-8")
    return folder


def _named(messages: list[str], key: str) -> int:
    """How many of the messages name `key` as a key (followed by ',', ':' or ' =')."""
    return sum(message.count(f"{key},") + message.count(f"{key}:") + message.count(f"{key} =")
               for message in messages)


# ------------------------------------------------------------------------- every key diffusion-pipe reads

MINIMAL_RUN = {"output_dir": "out", "dataset": "d.toml", "epochs": 3, "save_every_n_epochs": 1,
               "model": {"type": "wan", "ckpt_path": "m", "dtype": "bfloat16"},
               "adapter": {"type": "lora", "rank": 4, "dtype": "bfloat16"},
               "optimizer": {"type": "adamw", "lr": 0.001}}
MINIMAL_DATASET = {"resolutions": [256], "frame_buckets": [17], "directory": [{"path": "clips"}]}


# A value of each key diffusion-pipe reads for a Wan LoRA run, other than its default where it has one.
RUN_SAMPLES = {
    "output_dir": "elsewhere", "dataset": "other.toml", "epochs": 7, "max_steps": 50, "micro_batch_size_per_gpu": 2,
    "pipeline_stages": 1, "gradient_accumulation_steps": 4, "gradient_clipping": 0.5, "warmup_steps": 10,
    "lr_scheduler": "cosine", "eval_every_n_epochs": 2, "eval_before_first_step": False,
    "eval_micro_batch_size_per_gpu": 1, "eval_gradient_accumulation_steps": 2, "disable_block_swap_for_eval": True,
    "save_every_n_epochs": 3, "save_every_n_steps": 100, "save_every_n_examples": 1000,
    "checkpoint_every_n_epochs": 5, "checkpoint_every_n_minutes": 60, "activation_checkpointing": "unsloth",
    "blocks_to_swap": 20, "partition_method": "uniform", "save_dtype": "float32", "caching_batch_size": 4,
    "compile": True, "steps_per_print": 10, "video_clip_mode": "single_middle",
    "eval_datasets": [{"name": "held out", "config": "eval.toml"}], "eval_every_n_steps": 50,
    "eval_every_n_examples": 400, "eval_image_micro_batch_size_per_gpu": 4, "image_eval_micro_batch_size_per_gpu": 4,
    "image_micro_batch_size_per_gpu": [[512, 4], [1024, 1]], "logging_steps": 5, "x_axis_examples": True,
    "partition_split": [10], "reentrant_activation_checkpointing": True, "map_num_proc": 8, "regenerate_cache": True,
    "force_constant_lr": 1e-5, "uncond_fraction": 0.1, "huber_delta": 0.5, "smooth_l1_beta": 0.5,
    "pseudo_huber_c": 0.5, "resume_from_checkpoint": True,
    "model.type": "wan", "model.ckpt_path": "/models/Wan2.1-I2V-14B-480P", "model.dtype": "float32",
    "model.transformer_dtype": "float8_e4m3fn", "model.timestep_sample_method": "uniform", "model.shift": 3.0,
    "model.transformer_path": "/models/comfyui/wan2.1_i2v_480p_14B_bf16.safetensors",
    "model.llm_path": "/models/comfyui/umt5-xxl-enc-bf16.safetensors", "model.min_t": 0.0, "model.max_t": 0.9,
    "model.sigmoid_scale": 1.5, "model.flux_shift": True, "model.cache_text_embeddings": False,
    "model.text_encoder_fp8": True,
    "adapter.type": "lora", "adapter.rank": 16, "adapter.dtype": "float32", "adapter.init_from_existing": "old/epoch5",
    "adapter.dropout": 0.05, "adapter.exclude_modules": ["ffn"],
    "optimizer.type": "stableadamw", "optimizer.lr": 1e-4, "optimizer.betas": [0.9, 0.95],
    "optimizer.weight_decay": 0.1, "optimizer.eps": 1e-6, "optimizer.stabilize": True,
    "optimizer.gradient_release": True, "optimizer.beta2_half_life": 1000.0,
    "monitoring.enable_wandb": True, "monitoring.wandb_api_key": "key", "monitoring.wandb_tracker_name": "wan",
    "monitoring.wandb_run_name": "run",
}
_BUCKET_SAMPLES = {"resolutions": [[640, 360]], "enable_ar_bucket": True, "min_ar": 0.6, "max_ar": 1.8,
                   "num_ar_buckets": 5, "ar_buckets": [1.0, 1.5], "frame_buckets": [33], "num_repeats": 3,
                   "size_buckets": [[512, 512, 33]], "cache_shuffle_num": 4, "cache_shuffle_delimiter": ";",
                   "shuffle_tags": True, "caption_prefix": "wan style, ", "shuffle_metadata": False,
                   "skip_empty_caption": False, "online_captions": True}
DATASET_SAMPLES = {**_BUCKET_SAMPLES, "subsample_ratio": 0.5}
DIRECTORY_SAMPLES = {**_BUCKET_SAMPLES, "path": "more clips", "mask_path": "masks", "control_path": "control",
                     "default_mask_file": "mask.png"}


# Sample values the studio trains with its nearest equivalent (stableadamw as AdamW) or not at all (stabilize = true).
NAMED_FOR_THEIR_VALUE = {"optimizer.type", "optimizer.stabilize"}


def _keys_of(section, prefix: str = "") -> set[str]:
    """The diffusion-pipe keys a table (and the tables in it, but not [studio]) accepts: fields and kept keys."""
    keys = set()
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("internal") or f.name in ("studio", "directory"):
            continue
        if dataclasses.is_dataclass(value):
            keys |= _keys_of(value, f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys | {f"{prefix}{key}" for key in section.KEPT}


def _with(table: dict, dotted: str, value) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    *parents, name = dotted.split(".")
    target = out
    for part in parents:
        target = target.setdefault(part, {})
    target[name] = value
    return out


def test_the_accepted_keys_are_diffusion_pipes_keys():
    """The studio's list (schema fields + KEPT) is the list taken from diffusion-pipe's source in test_config, and
    every sample value is one diffusion-pipe accepts."""
    assert _keys_of(RunConfig()) == set(RUN_SAMPLES) == set(DIFFUSION_PIPE_RUN)
    assert _keys_of(DatasetConfig()) == set(DATASET_SAMPLES) == set(DIFFUSION_PIPE_DATASET) - {"directory"}
    assert _keys_of(DirectoryConfig()) == set(DIRECTORY_SAMPLES) == set(DIFFUSION_PIPE_DIRECTORY)
    for samples, accepted in ((RUN_SAMPLES, DIFFUSION_PIPE_RUN), (DATASET_SAMPLES, DIFFUSION_PIPE_DATASET),
                              (DIRECTORY_SAMPLES, DIFFUSION_PIPE_DIRECTORY)):
        assert [key for key, value in samples.items() if not accepted[key](value)] == []


@pytest.mark.parametrize("key", sorted(RUN_SAMPLES))
def test_every_run_key_imports_round_trips_and_is_named_when_not_used(tmp_path, key):
    src = tmp_path / "run.toml"
    src.write_text(tomli_w.dumps(_with(MINIMAL_RUN, key, RUN_SAMPLES[key])), encoding="utf-8")
    run = load_run_config(src)
    assert _raw(save_run_config(run, tmp_path / "again.toml")) == _raw(src)  # the same keys, values and types
    assert load_run_config(tmp_path / "again.toml") == run
    *parents, name = key.split(".")
    section = run
    for part in parents:
        section = getattr(section, part)
    applied = name in {f.name for f in dataclasses.fields(section)}
    unused = applied and section.__dataclass_fields__[name].metadata.get("unused")
    named = _named(notices(run), key)
    if applied and not unused and key not in NAMED_FOR_THEIR_VALUE:
        assert getattr(section, name) == RUN_SAMPLES[key] and key not in run.kept and named == 0
    else:
        assert named == 1, notices(run)  # kept or read-but-unused keys are named once


@pytest.mark.parametrize("where, key", [("top", key) for key in sorted(DATASET_SAMPLES)]
                         + [("directory", key) for key in sorted(DIRECTORY_SAMPLES)])
def test_every_dataset_key_imports_round_trips_and_is_named_when_not_used(tmp_path, where, key):
    table = dict(MINIMAL_DATASET)
    if where == "top":
        table[key] = DATASET_SAMPLES[key]
    else:
        table["directory"] = [{"path": "clips", key: DIRECTORY_SAMPLES[key]}]
    src = tmp_path / "dataset.toml"
    src.write_text(tomli_w.dumps(table), encoding="utf-8")
    dataset = load_dataset_config(src)
    assert _raw(save_dataset_config(dataset, tmp_path / "again.toml")) == _raw(src)
    assert load_dataset_config(tmp_path / "again.toml") == dataset
    section, dotted = (dataset, key) if where == "top" else (dataset.directory[0], f"directory.0.{key}")
    assert _named(notices(dataset=dataset), dotted) == (1 if key in section.KEPT else 0)
    if key not in section.KEPT:
        assert getattr(section, key) == (DATASET_SAMPLES if where == "top" else DIRECTORY_SAMPLES)[key]


def test_directory_only_keys_and_dataset_num_repeats(tmp_path):
    """mask_path & co. are [[directory]] keys; a dataset-level num_repeats is the default of every directory, as in
    diffusion-pipe's utils/dataset.py."""
    src = tmp_path / "d.toml"
    src.write_text(tomli_w.dumps({**MINIMAL_DATASET, "num_repeats": 4, "directory": [
        {"path": "a", "mask_path": "masks"}, {"path": "b", "num_repeats": 2}]}), encoding="utf-8")
    dataset = load_dataset_config(src)
    assert [dataset.bucket_settings(d)["num_repeats"] for d in dataset.directory] == [4, 2]
    assert dataset.directory[0].kept == {"mask_path": "masks"}
    with pytest.raises(ConfigError, match="Did you mean 'mask_path' in \\[\\[directory\\]\\]"):
        src.write_text(tomli_w.dumps({**MINIMAL_DATASET, "mask_path": "masks"}), encoding="utf-8")
        load_dataset_config(src)


@pytest.mark.parametrize("key, value, expected", [
    ("model.transformer_pth", "x", "Did you mean 'model.transformer_path'?"),
    ("model.vae_path", "x", "Keys allowed in [model]"),  # another model family's key: no near-match suggested
    ("model.blocks_to_swap", 4, "Did you mean 'blocks_to_swap' at the top level?"),
    ("adapter.lora_alpha", 8.0, "Did you mean 'lora_alpha' in [studio]?"),
    ("adapter.alpha", 8.0, "forces alpha = rank"),
    ("optimizer.weight_decy", 0.1, "Did you mean 'optimizer.weight_decay'?"),
    ("optimizer.warmup_steps", 5, "Did you mean 'warmup_steps' at the top level?"),
    ("lr_schedular", "cosine", "Did you mean 'lr_scheduler'?"),
    ("model.timestep_sample_method", "logit-normal", "Did you mean 'logit_normal'?"),
    ("optimizer.type", "adamw8bitkhan", "Did you mean 'AdamW8bitKahan'?"),
])
def test_unknown_keys_get_only_real_near_matches(tmp_path, key, value, expected):
    src = tmp_path / "run.toml"
    src.write_text(tomli_w.dumps(_with(MINIMAL_RUN, key, value)), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_run_config(src)
    message = str(info.value)
    assert expected in message and str(src) in message, message
    if "Did you mean" not in expected:
        assert "Did you mean" not in message, message


def test_optimizer_arguments_diffusion_pipe_passes_on_are_kept(tmp_path):
    """train.py passes every other [optimizer] key to the optimizer class, which it may load from pytorch_optimizer
    by name: kept and named; the studio refuses to train with an optimizer it does not have."""
    src = tmp_path / "run.toml"
    table = _with(_with(MINIMAL_RUN, "optimizer.type", "Prodigy"), "optimizer.d_coef", 2.0)
    src.write_text(tomli_w.dumps(table), encoding="utf-8")
    run = load_run_config(src)
    assert run.optimizer.kept == {"d_coef": 2.0}
    said = " ".join(notices(run))
    assert "optimizer.d_coef" in said and "'Prodigy' is kept for diffusion-pipe, but the studio cannot train" in said
    assert _raw(save_run_config(run, tmp_path / "again.toml")) == _raw(src)
    assert apply_overrides(run, {"optimizer.type": "adamw"}).optimizer.kept == {"d_coef": 2.0}
    # examples/main_example.toml's automagic table has no lr, and an [adapter] without dtype takes [model] dtype.
    automagic = {**MINIMAL_RUN, "optimizer": {"type": "automagic", "weight_decay": 0.01},
                 "adapter": {"type": "lora", "rank": 4}}
    src.write_text(tomli_w.dumps(automagic), encoding="utf-8")
    run = load_run_config(src)
    assert run.adapter.dtype is None and not run.optimizer.is_explicit("lr")
    assert _raw(save_run_config(run, tmp_path / "again.toml")) == _raw(src)


# ------------------------------------------------------------------------------------------- the field cases

def test_case_diffusion_pipe_keys_imports_and_names_what_is_not_used(tmp_path):
    """tdrussell/diffusion-pipe#165's run (ComfyUI single-file transformer + UMT5, eval keys) imports through the
    command the Train tab's notice also comes from; each unused key is named once; saving keeps the file."""
    clips = tmp_path / "clips"
    clips.mkdir()
    folder = _case("diffusion-pipe-keys", tmp_path / "case", CLIPS_DIR=str(clips), OUTPUT_DIR=str(tmp_path / "out"))
    run = load_run_config(folder / "run.toml")
    assert run.model.kept == {"transformer_path": "/models/comfyui/diffusion_models/wan2.1_i2v_480p_14B_bf16"
                                                  ".safetensors",
                              "llm_path": "/models/comfyui/text_encoders/umt5-xxl-enc-bf16.safetensors"}
    dataset = load_dataset_config(run.dataset_path())
    said = notices(run, dataset)
    for key in ("model.transformer_path", "model.llm_path", "eval_every_n_epochs", "eval_before_first_step",
                "eval_micro_batch_size_per_gpu", "eval_gradient_accumulation_steps", "partition_method"):
        assert _named(said, key) == 1, (key, said)
    assert _raw(save_run_config(run, tmp_path / "again.toml")) == _raw(folder / "run.toml")
    out = subprocess.run([sys.executable, "-m", "engine.training.config", "check", str(folder / "run.toml")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _named(out.stderr.splitlines(), "model.transformer_path") == 1 and "note: " in out.stderr
    assert 'transformer_path = "/models/comfyui' in out.stdout  # kept in the resolved file too


def test_case_export_relative_paths_runs_from_any_folder(tmp_path, tiny_models):
    """diffusion-pipe opens `dataset` and each [[directory]] path as written, from the folder it is started in: the
    exported pair holds absolute paths that name what the studio's files named, from the studio's own folder."""
    clips = tmp_path / "my clips é"
    clips.mkdir()
    folder = _case("export-relative-paths", tmp_path / "run folder", TINY_WAN_KIT=tiny_models.wan,
                   CLIPS_DIR=str(clips))
    run = load_run_config(folder / "run.toml")
    out = subprocess.run([sys.executable, "-m", "engine.training.config", "export", str(folder / "run.toml"),
                          str(tmp_path / "exported")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    run_toml, dataset_toml = (Path(line) for line in out.stdout.split())
    raw_run, raw_dataset = _raw(run_toml), _raw(dataset_toml)
    elsewhere = tmp_path / "diffusion-pipe checkout"
    elsewhere.mkdir()
    # What diffusion-pipe resolves, started in another folder: every path is absolute and names the same thing.
    assert Path(raw_run["dataset"]).is_absolute() and (elsewhere / raw_run["dataset"]) == dataset_toml
    assert Path(raw_run["output_dir"]) == run.output_path() == folder
    assert Path(raw_run["model"]["ckpt_path"]) == Path(tiny_models.wan).resolve()
    assert [Path(d["path"]) for d in raw_dataset["directory"]] == [clips]
    exported = load_run_config(run_toml)  # and the studio reads it back meaning the same
    assert exported.output_path() == run.output_path() and exported.dataset_path() == dataset_toml
    assert dataclasses.replace(exported, output_dir=".", dataset="dataset.toml") == run
    assert load_dataset_config(dataset_toml).directory_path(load_dataset_config(dataset_toml).directory[0]) == clips


def test_case_export_lora_alpha_says_what_differs(tmp_path, tiny_models):
    """diffusion-pipe's train.py forces alpha = rank: [studio] lora_alpha = 2 at rank 4 trains there at twice the
    studio's scale. The export says so; the file stays one diffusion-pipe accepts (no [adapter] alpha)."""
    clips = tmp_path / "clips"
    clips.mkdir()
    folder = _case("export-lora-alpha", tmp_path / "case", TINY_WAN_KIT=tiny_models.wan, CLIPS_DIR=str(clips))
    run = load_run_config(folder / "run.toml")
    exported = export_for_diffusion_pipe(run, load_dataset_config(run.dataset_path()), tmp_path / "exported")
    said = " ".join(exported.notices)
    assert "lora_alpha = 2 at rank 4" in said and "scale 0.5" in said and "2x the studio's scale" in said
    assert "alpha" not in _raw(exported.run_toml)["adapter"] and _raw(exported.run_toml)["studio"]["lora_alpha"] == 2
    swapped = apply_overrides(run, {"blocks_to_swap": 39, "activation_checkpointing": True})
    assert any("at most 38" in note for note in differences_in_diffusion_pipe(swapped))  # models/wan/wan.py asserts
    same = apply_overrides(run, {"studio.lora_alpha": 4.0})
    assert not any("lora_alpha" in n for n in export_for_diffusion_pipe(
        same, load_dataset_config(run.dataset_path()), tmp_path / "same").notices)


def test_case_cosine_schedule_round_trip_keeps_diffusion_pipes_meaning(tmp_path):
    """lr_scheduler = 'cosine' read and saved stays 'cosine' (no [studio] switch); the file the earlier studio wrote
    ('linear' + [studio] cosine_schedule) reads as that cosine and is saved the same way."""
    clips = tmp_path / "clips"
    clips.mkdir()
    folder = _case("cosine-schedule-roundtrip", tmp_path / "case", CLIPS_DIR=str(clips))
    run = load_run_config(folder / "in.toml")
    assert run.lr_scheduler == "cosine"
    saved = _raw(save_run_config(run, tmp_path / "resaved.toml"))
    assert saved == _raw(folder / "in.toml") and "studio" not in saved
    earlier = load_run_config(folder / "resaved_by_studio.toml")
    assert earlier.lr_scheduler == "cosine" and earlier == run
    assert _raw(save_run_config(earlier, tmp_path / "again.toml")) == saved
    contradiction = folder / "contradiction.toml"
    contradiction.write_text((folder / "resaved_by_studio.toml").read_text().replace('"linear"', '"constant"'))
    with pytest.raises(ConfigError, match="'lr_scheduler' and 'studio.cosine_schedule'.* disagree"):
        load_run_config(contradiction)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_follows_diffusion_pipes_schedulers(schedule, warmup):
    """The trainer's learning rate at each optimizer step equals torch's schedulers built as diffusion-pipe's train.py
    builds them (LinearLR warm-up, then SequentialLR into ConstantLR / LinearLR / CosineAnnealingLR eta_min=1e-6,
    over epochs x steps per epoch), stepped once per optimizer step."""
    lr, steps = 2e-4, 20
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    after = {"constant": lambda: torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0),
             "linear": lambda: torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0,
                                                                  total_iters=steps),
             "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=1e-6)}
    scheduler = after[schedule]()
    if warmup:
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, scheduler], milestones=[warmup])
    expected = []
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [learning_rate(s, lr=lr, warmup_steps=warmup, schedule_steps=steps, schedule=schedule)
            for s in range(steps)]
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert len(set(ours)) == (1 if schedule == "constant" and not warmup else len(set(ours)))
    if schedule != "constant":  # the decay is there: the last step is well below the peak
        assert ours[-1] < 0.5 * lr
