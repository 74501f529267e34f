"""Run and dataset TOMLs: exact round trips, errors that name the key and file, form helpers, presets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine.training.config import load_dataset_config, load_run_config, save_dataset_config, save_run_config
from engine.training.form import apply_overrides, describe_fields
from engine.training.interop import notices
from engine.training.presets import dataset_presets, preset_configs, presets
from engine.training.schema import ConfigError, DatasetConfig, RunConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REPO = Path(__file__).resolve().parents[2]


def _raw(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def fixtures(tmp_path) -> Path:
    """A copy of the fixture TOMLs in a folder with awkward characters."""
    folder = tmp_path / "conf 'ü'"
    shutil.copytree(FIXTURES, folder)
    return folder


def test_min_vram_run_reads_the_seed_values(fixtures):
    cfg = load_run_config(fixtures / "min_vram.toml")
    assert cfg.epochs == 1000
    assert cfg.adapter.rank == 32 and cfg.lora_alpha == 32.0
    assert cfg.optimizer.type == "AdamW8bitKahan"
    assert cfg.optimizer.lr == pytest.approx(2e-5)
    assert cfg.optimizer.betas == [0.9, 0.99]
    assert cfg.optimizer.weight_decay == 0.01
    assert cfg.model.transformer_dtype == "float8"
    assert cfg.blocks_to_swap == 32
    assert cfg.activation_checkpointing == "unsloth" and cfg.checkpointing_mode == "offload"
    assert cfg.dataset_path() == (fixtures / "min_vram_dataset.toml").resolve()
    assert cfg.output_path() == (fixtures / "runs" / "min vram").resolve()


@pytest.mark.parametrize("run_name", ["min_vram.toml", "studio_extras.toml"])
def test_run_round_trip_is_exact_and_adds_no_keys(fixtures, tmp_path, run_name):
    cfg = load_run_config(fixtures / run_name)
    out = save_run_config(cfg, tmp_path / "out" / "run.toml")
    assert _raw(out) == _raw(fixtures / run_name)  # same keys, same values, nothing added
    again = load_run_config(out)
    assert again == cfg


def test_dataset_round_trip_is_exact(fixtures, tmp_path):
    cfg = load_dataset_config(fixtures / "min_vram_dataset.toml")
    assert cfg.resolutions == [512] and cfg.frame_buckets == [1, 33, 81]
    assert cfg.directory[0].num_repeats == 5
    assert cfg.directory_path(cfg.directory[0]) == (fixtures / "clips").resolve()
    out = save_dataset_config(cfg, tmp_path / "dataset.toml")
    assert _raw(out) == _raw(fixtures / "min_vram_dataset.toml")
    assert "[[directory]]" in out.read_text()
    assert load_dataset_config(out) == cfg


def test_studio_table_values(fixtures):
    cfg = load_run_config(fixtures / "studio_extras.toml")
    assert cfg.studio.lora_alpha == 8.0 and cfg.lora_alpha == 8.0
    assert cfg.compile is True and cfg.studio.seed == 7 and cfg.model.shift == 3.0
    assert cfg.studio.samples.epochs == [2, 4] and cfg.studio.samples.frames == 33
    # Each [studio] switch refines the diffusion-pipe value beside it into the mode the trainer runs.
    assert (cfg.activation_checkpointing, cfg.checkpointing_mode) == (True, "selective")
    assert (cfg.model.transformer_dtype, cfg.studio.float8_matmuls) == ("float8", True)
    assert cfg.lr_scheduler == "cosine"  # diffusion-pipe's own cosine schedule, not a [studio] switch
    assert (cfg.video_clip_mode, cfg.clip_mode) == ("single_beginning", "multiple_overlapping")


def test_minimal_file_writes_only_its_own_keys(tmp_path):
    src = tmp_path / "run.toml"
    src.write_text('output_dir = "out"\ndataset = "d.toml"\nepochs = 3\nsave_every_n_epochs = 1\n'
                   '[model]\ntype = "wan"\nckpt_path = "m"\ndtype = "float32"\n'
                   '[adapter]\ntype = "lora"\nrank = 4\ndtype = "float32"\n'
                   '[optimizer]\ntype = "adamw"\nlr = 0.001\n')
    cfg = load_run_config(src)
    assert cfg.blocks_to_swap == 0 and cfg.studio.seed == 42  # defaults are in force ...
    out = save_run_config(cfg, tmp_path / "again.toml")
    assert _raw(out) == _raw(src)  # ... but not written as noise
    changed = apply_overrides(cfg, {"blocks_to_swap": 4})
    assert _raw(save_run_config(changed, tmp_path / "changed.toml"))["blocks_to_swap"] == 4


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_optimi", "adamw8bit", "AdamW8bitKahan", "adamw8bitkahan"])
def test_diffusion_pipe_optimizer_names_are_accepted(fixtures, optimizer):
    cfg = load_run_config(fixtures / "min_vram.toml")
    assert apply_overrides(cfg, {"optimizer.type": optimizer}).optimizer.type == optimizer


def _write_variant(fixtures: Path, old: str, new: str) -> Path:
    path = fixtures / "variant.toml"
    text = (fixtures / "min_vram.toml").read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("old, new, expected", [
    ("blocks_to_swap = 32", "blocks_to_swap = 32\nblock_to_swap = 3", ["'block_to_swap'", "blocks_to_swap"]),
    ('type = "AdamW8bitKahan"', 'type = "adamw8bitkhan"', ["'optimizer.type'", "Did you mean 'AdamW8bitKahan'?",
                                                           "adamw_optimi", "pytorch_optimizer class name"]),
    ('transformer_dtype = "float8"', 'transformer_dtype = "fp8"', ["'model.transformer_dtype'", "'float8'"]),
    ("rank = 32", 'rank = "32"', ["'adapter.rank'", "integer"]),
    ("rank = 32", "rank = 0", ["'adapter.rank'", "range 1 .. 256"]),
    ("blocks_to_swap = 32", "blocks_to_swap = 40", ["'blocks_to_swap'", "0 .. 39"]),
    ('activation_checkpointing = "unsloth"', 'activation_checkpointing = "yes"',
     ["'activation_checkpointing'", "true", "'unsloth'"]),
    ("betas = [0.9, 0.99]", 'betas = [0.9, "x"]', ["'optimizer.betas'", "list of number"]),
    ("[monitoring]", "[monitoring]\nlog_dir = 'x'", ["'monitoring.log_dir'", "enable_wandb"]),
    ('ckpt_path = "/models/Wan2.1-I2V-14B-480P-Diffusers"\n', "", ["Missing key 'model.ckpt_path'"]),
    ("epochs = 1000", "epochs = 1000\n[[epochs_table]]", ["'epochs_table'"]),
    ("[model]", "model = 3\n[x]", ["'model'", "must be a table"]),
])
def test_bad_keys_name_the_key_the_file_and_what_is_allowed(fixtures, old, new, expected):
    path = _write_variant(fixtures, old, new)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    for part in expected:
        assert part in message, message
    assert str(path.resolve()) in message


@pytest.mark.parametrize("old, new, expected", [
    ("num_repeats = 5", "num_repeats = 5\nrepeats = 2", ["'directory.0.repeats'", "num_repeats"]),
    ("min_ar = 0.5", "min_ar = 3.0", ["'min_ar'", "'max_ar'"]),
    ("resolutions = [512]", "resolutions = [[512, 0]]", ["'resolutions'", "[width, height]"]),
    ('path = "clips"', "", ["Missing key 'directory.0.path'"]),
])
def test_bad_dataset_keys_are_named(fixtures, old, new, expected):
    text = (fixtures / "min_vram_dataset.toml").read_text()
    path = fixtures / "bad dataset.toml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_dataset_config(path)
    for part in [*expected, str(path.resolve())]:
        assert part in str(info.value), str(info.value)


def test_dataset_without_directory_is_an_error(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text("resolutions = [256]\nframe_buckets = [17]\n")
    with pytest.raises(ConfigError, match="directory"):
        load_dataset_config(path)


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.toml")


def test_per_directory_bucket_overrides(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('resolutions = [256]\nframe_buckets = [17, 33]\n[[directory]]\npath = "a"\n'
                    '[[directory]]\npath = "b"\nnum_repeats = 3\nframe_buckets = [9]\nresolutions = [[320, 192]]\n')
    cfg = load_dataset_config(path)
    assert cfg.bucket_settings(cfg.directory[0])["frame_buckets"] == [17, 33]
    assert cfg.bucket_settings(cfg.directory[1])["frame_buckets"] == [9]
    assert cfg.bucket_settings(cfg.directory[1])["resolutions"] == [[320, 192]]
    assert _raw(save_dataset_config(cfg, tmp_path / "out.toml")) == _raw(path)


def test_frame_buckets_must_be_4k_plus_1(tmp_path):
    """Caching builds the first-frame mask in groups of 4 latent-packed frames: a 20-frame bucket used to pass every
    check and then crash while caching. It is named at load time, with the 4k+1 counts around it."""
    path = tmp_path / "d.toml"
    path.write_text('resolutions = [256]\nframe_buckets = [17]\n[[directory]]\npath = "a"\nframe_buckets = [20]\n')
    with pytest.raises(ConfigError, match=r"frame bucket 20 .*4k\+1.*use 17 or 21"):
        load_dataset_config(path)
    path.write_text(path.read_text().replace("[20]", "[21]"))
    cfg = load_dataset_config(path)
    with pytest.raises(ConfigError, match="frame bucket 32"):
        apply_overrides(cfg, {"frame_buckets": [32]})


def test_describe_fields_documents_every_setting(fixtures):
    cfg = load_run_config(fixtures / "min_vram.toml")
    fields = {f.key: f for f in describe_fields(cfg)}
    assert {"epochs", "optimizer.lr", "model.transformer_dtype", "studio.samples.epochs", "compile",
            "studio.float8_matmuls"} <= set(fields)
    assert all(f.help for f in fields.values())
    assert fields["optimizer.type"].choices == ("adamw", "adamw_optimi", "adamw8bit", "AdamW8bitKahan")
    assert fields["blocks_to_swap"].value == 32 and fields["blocks_to_swap"].default == 0
    assert fields["blocks_to_swap"].maximum == 39 and fields["blocks_to_swap"].type == "integer"
    assert fields["max_steps"].optional and not fields["epochs"].optional
    dataset = load_dataset_config(fixtures / "min_vram_dataset.toml")
    keys = [f.key for f in describe_fields(dataset)]
    assert "directory.0.num_repeats" in keys and "frame_buckets" in keys
    assert not any(f.key.startswith("directory") for f in describe_fields(DatasetConfig()))


def test_apply_overrides_validates_and_parses_form_text(fixtures):
    cfg = load_run_config(fixtures / "min_vram.toml")
    new = apply_overrides(cfg, {"optimizer.lr": "1e-4", "optimizer.betas": "[0.8, 0.95]", "epochs": 12.0,
                                "activation_checkpointing": "true", "studio.samples.prompt": "a spin",
                                "max_steps": "", "studio.lora_alpha": "16"})
    assert new.optimizer.lr == 1e-4 and new.optimizer.betas == [0.8, 0.95] and new.epochs == 12
    assert new.activation_checkpointing is True and new.studio.samples.prompt == "a spin"
    assert new.max_steps is None and new.lora_alpha == 16.0
    assert cfg.optimizer.lr == pytest.approx(2e-5)  # the original is untouched
    for bad, message in [({"optimizer.lr": "fast"}, "'optimizer.lr'"), ({"model.nope": 1}, "'model.nope'"),
                         ({"epochs": 0}, "'epochs'"), ({"model": 1}, "'model'"),
                         ({"activation_checkpointing": "partial"}, "'unsloth'")]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(cfg, bad)
    dataset = apply_overrides(load_dataset_config(fixtures / "min_vram_dataset.toml"),
                              {"directory.0.num_repeats": 2, "frame_buckets": "[17]"})
    assert dataset.directory[0].num_repeats == 2 and dataset.frame_buckets == [17]


def test_presets_build_valid_configs_that_round_trip(tmp_path):
    assert list(presets()) == ["24 GB GPU (low memory)", "48 GB", "80 GB", "CPU demo (tiny model)"]
    assert set(dataset_presets()) == set(presets())
    for name in presets():
        run_dir = tmp_path / name.replace(" ", "_")
        run, dataset = preset_configs(name, clips_dir=tmp_path / "clips", output_dir=run_dir, model_path="m")
        run_file = save_run_config(run, run_dir / "run.toml")
        save_dataset_config(dataset, run_dir / "dataset.toml")
        loaded = load_run_config(run_file)
        assert loaded == run
        assert loaded.dataset_path() == (run_dir / "dataset.toml").resolve()
        assert load_dataset_config(loaded.dataset_path()) == dataset
        assert all(f % 4 == 1 for f in dataset.frame_buckets)
    low, _ = preset_configs("24 GB GPU (low memory)", clips_dir="c", output_dir="o", model_path="m")
    # The measured 24 GB setting (bench/RESULTS.md, 22 GiB reserved): float8 matmuls, 34 swapped blocks, offloaded
    # checkpoints.
    assert (low.model.transformer_dtype, low.studio.float8_matmuls, low.blocks_to_swap, low.activation_checkpointing,
            low.optimizer.type) == ("float8", True, 34, "unsloth", "AdamW8bitKahan")
    # The modes each preset trains with, as before they moved into [studio] switches (then 'float8_compute',
    # 'selective' and [studio] compile): (float8 storage, float8 matmuls, checkpointing, compile, schedule, clips).
    modes = {}
    for name in presets():
        run, _ = preset_configs(name, clips_dir="c", output_dir="o", model_path="m")
        modes[name] = (run.model.transformer_dtype == "float8", run.studio.float8_matmuls, run.checkpointing_mode,
                       run.compile, run.lr_scheduler, run.clip_mode, run.model.shift)
    assert modes == {"24 GB GPU (low memory)": (True, True, "offload", True, "constant", "single_beginning", 1.0),
                     "48 GB": (True, True, "full", True, "constant", "single_beginning", 1.0),
                     "80 GB": (True, True, "selective", True, "constant", "single_beginning", 1.0),
                     "CPU demo (tiny model)": (False, False, None, False, "constant", "single_beginning", 1.0)}
    demo_run, demo_data = preset_configs("CPU demo (tiny model)", clips_dir="c", output_dir="o", model_path="m")
    assert demo_run.model.dtype == "float32" and 4 <= demo_run.adapter.rank <= 8
    assert demo_run.save_every_n_epochs == 1 and demo_run.epochs <= 5 and demo_data.frame_buckets == [17]
    with pytest.raises(ConfigError, match="Unknown preset"):
        preset_configs("12 GB", clips_dir="c", output_dir="o", model_path="m")


def test_check_command(fixtures):
    ok = subprocess.run([sys.executable, "-m", "engine.training.config", "check", str(fixtures / "min_vram.toml")],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert 'transformer_dtype = "float8"' in ok.stdout and "[[directory]]" in ok.stdout
    assert "shift = 1.0" in ok.stdout and "float8_matmuls = false" in ok.stdout  # resolved: defaults shown
    bad = _write_variant(fixtures, "epochs = 1000", "epoch = 1000")
    failed = subprocess.run([sys.executable, "-m", "engine.training.config", "check", str(bad)], cwd=REPO,
                            capture_output=True, text=True)
    assert failed.returncode == 1 and "'epoch'" in failed.stderr


def test_programmatic_configs_are_plain_dataclasses():
    run = RunConfig(output_dir="o", dataset="d.toml")
    assert run.adapter.rank == 32 and run.checkpointing_mode is None
    assert DatasetConfig().frame_buckets == [81]


# ------------------------------------------------------------------------ diffusion-pipe's own files and defaults

def test_diffusion_pipe_wan_min_vram_example_imports(fixtures, tmp_path):
    """diffusion-pipe's examples/wan_14b_min_vram.toml gives AdamW8bitKahan `stabilize = false` and no eps."""
    path = _write_variant(fixtures, "eps = 1e-8", "stabilize = false")
    cfg = load_run_config(path)
    assert cfg.optimizer.stabilize is False and cfg.optimizer.eps == 1e-8
    assert _raw(save_run_config(cfg, tmp_path / "run.toml")) == _raw(path)
    # stabilize = true is diffusion-pipe's too: kept for it, and named as what the studio's optimizers do not do.
    stabilized = load_run_config(_write_variant(fixtures, "eps = 1e-8", "stabilize = true"))
    assert stabilized.optimizer.stabilize is True
    assert any("optimizer.stabilize = true" in note for note in notices(stabilized))
    assert notices(cfg) == notices(load_run_config(fixtures / "min_vram.toml"))  # false is what the studio does


def test_keys_left_out_mean_what_they_mean_to_diffusion_pipe(tmp_path):
    """diffusion-pipe's train.py: micro_batch_size_per_gpu 1 and activation_checkpointing false when unset; its
    dataset.py: enable_ar_bucket false (one square bucket)."""
    src = tmp_path / "run.toml"
    src.write_text('output_dir = "out"\ndataset = "d.toml"\nepochs = 3\nsave_every_n_epochs = 1\n'
                   '[model]\ntype = "wan"\nckpt_path = "m"\ndtype = "bfloat16"\n'
                   '[adapter]\ntype = "lora"\nrank = 4\ndtype = "bfloat16"\n'
                   '[optimizer]\ntype = "adamw"\nlr = 0.001\n')
    run = load_run_config(src)
    assert run.micro_batch_size_per_gpu == 1
    assert run.activation_checkpointing is False and run.checkpointing_mode is None
    assert _raw(save_run_config(run, tmp_path / "again.toml")) == _raw(src)
    data = tmp_path / "d.toml"
    data.write_text('resolutions = [256]\nframe_buckets = [17]\n[[directory]]\npath = "clips"\n')
    dataset = load_dataset_config(data)
    assert dataset.bucket_settings(dataset.directory[0])["enable_ar_bucket"] is False
    # The presets' aspect buckets are written out, so diffusion-pipe buckets the same way.
    _, preset = preset_configs("48 GB", clips_dir="c", output_dir="o", model_path="m")
    assert _raw(save_dataset_config(preset, tmp_path / "preset.toml"))["enable_ar_bucket"] is True


def test_a_run_saves_loras_on_a_set_cadence_as_diffusion_pipe_requires(fixtures, tmp_path):
    """diffusion-pipe's train.py refuses a config without save_every_n_epochs or save_every_n_steps, and saves no
    epoch LoRAs when only steps are set."""
    steps_only = load_run_config(_write_variant(fixtures, "save_every_n_epochs = 10", "save_every_n_steps = 50"))
    assert steps_only.save_every_n_epochs is None and steps_only.save_every_n_steps == 50
    path = _write_variant(fixtures, "save_every_n_epochs = 10\n", "")
    with pytest.raises(ConfigError, match="'save_every_n_epochs' or 'save_every_n_steps'") as info:
        load_run_config(path)
    assert str(path.resolve()) in str(info.value)
    built = RunConfig(output_dir="o", dataset="d.toml")
    with pytest.raises(ConfigError, match="'save_every_n_epochs' or 'save_every_n_steps'"):
        save_run_config(built, tmp_path / "run.toml")
    saved = save_run_config(apply_overrides(built, {"save_every_n_epochs": 1}), tmp_path / "run.toml")
    assert _raw(saved)["save_every_n_epochs"] == 1


# ------------------------------------------------------------- what diffusion-pipe accepts in the keys we write

def _one_of(*allowed):
    return lambda v: any(type(v) is type(a) and v == a for a in allowed)


def _count(v) -> bool:
    return type(v) is int and v >= 1


def _number(v) -> bool:
    return type(v) in (int, float)


def _text(v) -> bool:
    return type(v) is str


def _flag(v) -> bool:
    return type(v) is bool


def _sizes(v) -> bool:  # resolutions / ar_buckets: numbers or [w, h] pairs (utils/dataset.py)
    return isinstance(v, list) and all(_number(x) or (isinstance(x, list) and len(x) == 2) for x in v)


# What diffusion-pipe (github.com/tdrussell/diffusion-pipe) accepts in each key of a Wan LoRA run, from its source:
# train.py (set_config_defaults; the activation_checkpointing, lr_scheduler and optimizer-name branches; `compile`),
# utils/common.py (DTYPE_MAP, get_t_distribution), models/base.py (extract_clips: 'multiple_overlapping' is commented
# out there), models/wan/wan.py (`shift` in prepare_inputs) and utils/dataset.py (the dataset keys). A key missing
# here is one diffusion-pipe does not read.
_DP_DTYPE = _one_of("float32", "float16", "bfloat16", "float8", "float8_e4m3fn", "float8_e5m2")


def _batch(v) -> bool:  # an integer, or [[resolution, batch size], ...] (train.py)
    return _count(v) or (isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 for x in v))
_DP_OPTIMIZERS = {"adamw", "adamw8bit", "adamw_optimi", "stableadamw", "sgd", "adamw8bitkahan", "offload",
                  "automagic", "genericoptim"}  # train.py lowercases the name; others come from pytorch_optimizer
DIFFUSION_PIPE_RUN = {
    "output_dir": _text, "dataset": _text, "epochs": _count, "max_steps": _count, "micro_batch_size_per_gpu": _count,
    "pipeline_stages": _count, "gradient_accumulation_steps": _count, "gradient_clipping": _number,
    "warmup_steps": lambda v: type(v) is int and v >= 0, "lr_scheduler": _one_of("constant", "linear", "cosine"),
    "eval_every_n_epochs": _count, "eval_before_first_step": _flag, "eval_micro_batch_size_per_gpu": _count,
    "eval_gradient_accumulation_steps": _count, "disable_block_swap_for_eval": _flag, "save_every_n_epochs": _count,
    "save_every_n_steps": _count, "checkpoint_every_n_epochs": _count, "checkpoint_every_n_minutes": _count,
    "activation_checkpointing": _one_of(False, True, "unsloth"), "blocks_to_swap": lambda v: type(v) is int,
    "partition_method": _text, "save_dtype": _DP_DTYPE, "caching_batch_size": _count, "compile": _flag,
    "steps_per_print": _count, "video_clip_mode": _one_of("single_beginning", "single_middle"),
    "model.type": _one_of("wan"), "model.ckpt_path": _text, "model.dtype": _DP_DTYPE,
    "model.transformer_dtype": _DP_DTYPE, "model.timestep_sample_method": _one_of("logit_normal", "uniform"),
    "model.shift": lambda v: _number(v) and v > 0,
    "adapter.type": _one_of("lora"), "adapter.rank": _count, "adapter.dtype": _DP_DTYPE,
    "adapter.init_from_existing": _text,  # no 'alpha': train.py refuses it
    "optimizer.type": lambda v: _text(v) and v.lower() in _DP_OPTIMIZERS, "optimizer.lr": _number,
    "optimizer.betas": lambda v: isinstance(v, list) and len(v) == 2 and all(map(_number, v)),
    "optimizer.weight_decay": _number, "optimizer.eps": _number, "optimizer.stabilize": _flag,
    "monitoring.enable_wandb": _flag, "monitoring.wandb_api_key": _text, "monitoring.wandb_tracker_name": _text,
    "monitoring.wandb_run_name": _text,
    # read by train.py (main, set_config_defaults, get_optimizer), models/base.py (get_loss_fn), models/wan/wan.py,
    # utils/common.py (get_t_distribution); pseudo_huber_c and image_eval_micro_batch_size_per_gpu are only named
    # in examples/main_example.toml
    "save_every_n_examples": _count, "eval_datasets": lambda v: isinstance(v, list) and all(
        _text(d) or (isinstance(d, dict) and {"name", "config"} <= set(d)) for d in v),
    "eval_every_n_steps": _count, "eval_every_n_examples": _count,
    "eval_image_micro_batch_size_per_gpu": _batch, "image_eval_micro_batch_size_per_gpu": _batch,
    "image_micro_batch_size_per_gpu": _batch, "logging_steps": _count, "x_axis_examples": _flag,
    "partition_split": lambda v: isinstance(v, list), "reentrant_activation_checkpointing": _flag,
    "map_num_proc": _count, "regenerate_cache": _flag, "force_constant_lr": _number, "uncond_fraction": _number,
    "huber_delta": _number, "smooth_l1_beta": _number, "pseudo_huber_c": _number,
    "resume_from_checkpoint": lambda v: _flag(v) or _text(v),
    "model.transformer_path": _text, "model.llm_path": _text, "model.min_t": _number, "model.max_t": _number,
    "model.sigmoid_scale": _number, "model.flux_shift": _flag, "model.cache_text_embeddings": _flag,
    "model.text_encoder_fp8": _flag, "adapter.dropout": _number,
    "adapter.exclude_modules": lambda v: _text(v) or isinstance(v, list),
    "optimizer.gradient_release": _flag, "optimizer.beta2_half_life": _number,
}
DIFFUSION_PIPE_RUN_REQUIRED = ("output_dir", "dataset", "model.type", "model.ckpt_path", "model.dtype",
                               "optimizer.type")
_DP_BUCKETS = {"resolutions": _sizes, "enable_ar_bucket": _flag, "min_ar": lambda v: _number(v) and v > 0,
               "max_ar": lambda v: _number(v) and v > 0, "num_ar_buckets": _count, "ar_buckets": _sizes,
               "frame_buckets": lambda v: isinstance(v, list) and all(map(_count, v))}
# utils/dataset.py: DirectoryDataset reads these per directory, defaulting to the dataset's (_set_defaults and the
# .get(key, dataset_config.get(key)) reads); Dataset reads subsample_ratio.
_DP_DIRECTORY_DEFAULTS = {"num_repeats": _count, "size_buckets": lambda v: isinstance(v, list),
                          "cache_shuffle_num": lambda v: type(v) is int, "cache_shuffle_delimiter": _text,
                          "shuffle_tags": _flag, "caption_prefix": _text, "shuffle_metadata": _flag,
                          "skip_empty_caption": _flag, "online_captions": _flag}
DIFFUSION_PIPE_DATASET = {**_DP_BUCKETS, **_DP_DIRECTORY_DEFAULTS, "subsample_ratio": _number,
                          "directory": lambda v: isinstance(v, list) and v}
DIFFUSION_PIPE_DIRECTORY = {**_DP_BUCKETS, **_DP_DIRECTORY_DEFAULTS, "path": _text, "mask_path": _text,
                            "control_path": _text, "default_mask_file": _text}


def _not_accepted(table: dict, accepted: dict, prefix: str = "") -> list[str]:
    """The keys of a written TOML table diffusion-pipe would not accept ([studio] is ours: diffusion-pipe skips it)."""
    problems = []
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if dotted == "studio":
            continue
        if isinstance(value, dict):
            problems += _not_accepted(value, accepted, f"{dotted}.")
        elif dotted not in accepted:
            problems.append(f"{dotted} (not a diffusion-pipe key)")
        elif not accepted[dotted](value):
            problems.append(f"{dotted} = {value!r}")
    return problems


def diffusion_pipe_problems(run: dict, dataset: dict) -> list[str]:
    problems = _not_accepted(run, DIFFUSION_PIPE_RUN)
    flat = {f"{table}.{key}" for table, values in run.items() if isinstance(values, dict) for key in values} | set(run)
    problems += [f"{key} missing" for key in DIFFUSION_PIPE_RUN_REQUIRED if key not in flat]
    if "save_every_n_epochs" not in run and "save_every_n_steps" not in run:
        problems.append("save cadence missing")  # train.py asserts one is set
    problems += _not_accepted(dataset, DIFFUSION_PIPE_DATASET)
    for directory in dataset.get("directory", []):
        problems += [f"[[directory]] {problem}" for problem in _not_accepted(directory, DIFFUSION_PIPE_DIRECTORY)]
    needed = ["resolutions", "directory"]
    aspect_buckets = dataset.get("enable_ar_bucket") or any(d.get("enable_ar_bucket") for d in dataset["directory"])
    if aspect_buckets and "ar_buckets" not in dataset:  # read without a default in utils/dataset.py
        needed += ["min_ar", "max_ar", "num_ar_buckets"]
    return problems + [f"dataset {key} missing" for key in needed if key not in dataset]


@pytest.mark.parametrize("name", list(presets()))
def test_every_preset_writes_files_diffusion_pipe_accepts(tmp_path, name):
    run, dataset = preset_configs(name, clips_dir=tmp_path / "clips", output_dir=tmp_path, model_path="m")
    run_file = save_run_config(run, tmp_path / "run.toml")
    dataset_file = save_dataset_config(dataset, tmp_path / "dataset.toml")
    assert diffusion_pipe_problems(_raw(run_file), _raw(dataset_file)) == []


@pytest.mark.parametrize("run_name", ["min_vram.toml", "studio_extras.toml", "legacy_studio_extras.toml"])
def test_files_written_again_are_accepted_by_diffusion_pipe(fixtures, tmp_path, run_name):
    dataset_file = fixtures / "min_vram_dataset.toml"
    run_file = save_run_config(load_run_config(fixtures / run_name), tmp_path / "run.toml")
    assert diffusion_pipe_problems(_raw(run_file), _raw(dataset_file)) == []  # min_vram: the table's own check


def test_runs_of_earlier_studio_versions_load_meaning_the_same_and_save_in_the_current_form(fixtures, tmp_path):
    legacy = load_run_config(fixtures / "legacy_studio_extras.toml")
    assert legacy == load_run_config(fixtures / "studio_extras.toml")
    assert (legacy.model.transformer_dtype, legacy.studio.float8_matmuls, legacy.checkpointing_mode,
            legacy.lr_scheduler, legacy.clip_mode, legacy.compile, legacy.model.shift) == (
        "float8", True, "selective", "cosine", "multiple_overlapping", True, 3.0)
    out = save_run_config(legacy, tmp_path / "run.toml")
    assert _raw(out) == _raw(fixtures / "studio_extras.toml")
    assert load_run_config(out) == legacy
    # Overrides in code read the old values the same way, as a file would.
    built = apply_overrides(RunConfig(output_dir="o", dataset="d.toml"), {
        "model.transformer_dtype": "float8_compute", "activation_checkpointing": "selective",
        "lr_scheduler": "cosine", "video_clip_mode": "multiple_overlapping", "studio.compile": True,
        "studio.timestep_shift": 3.0})
    assert (built.model.transformer_dtype, built.studio.float8_matmuls, built.checkpointing_mode, built.lr_scheduler,
            built.clip_mode, built.compile, built.model.shift) == (
        "float8", True, "selective", "cosine", "multiple_overlapping", True, 3.0)
    # An old setting and a current one that contradict each other: an error naming both.
    both = fixtures / "both.toml"
    both.write_text((fixtures / "legacy_studio_extras.toml").read_text().replace(
        "timestep_shift = 3.0", "timestep_shift = 3.0\nselective_checkpointing = false"))
    with pytest.raises(ConfigError, match="'activation_checkpointing' and 'studio.selective_checkpointing'.* "
                                          "disagree"):
        load_run_config(both)


@pytest.mark.parametrize("switch, key, other", [
    ("float8_matmuls", "model.transformer_dtype", "bfloat16"),
    ("selective_checkpointing", "activation_checkpointing", "unsloth"),
    ("overlapping_clips", "video_clip_mode", "single_middle"),
])
def test_a_studio_switch_needs_the_diffusion_pipe_value_it_refines(switch, key, other):
    run = RunConfig(output_dir="o", dataset="d.toml")
    with pytest.raises(ConfigError, match=f"'studio.{switch}' = true needs '{key}' = "):
        apply_overrides(run, {f"studio.{switch}": True, key: other})
