"""Data-parallel training through the trainer's DeepSpeed path: 2 CPU processes (gloo) launched by torchrun.

Checks caching split across ranks, dataset sharding, gradient averaging (2 ranks x accumulation k == 1 rank x 2k:
same losses, same LoRA), single-writer outputs, and resuming a 2-rank state on 1 process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine.test_train import REPO, build_trainer, events_of, saved_lora, write_clips, write_run

SETTINGS = {"max_steps": 6, "epochs": 100, "optimizer.lr": 5e-3, "studio.state_every_n_steps": 3,
            "checkpoint_every_n_epochs": None, "save_every_n_epochs": 3, "save_dtype": "float32",
            "gradient_clipping": 0.05}  # a low clip so clipping acts on the averaged gradient too


@pytest.fixture(scope="module")
def dist_project(tmp_path_factory, tiny_models, one_torch_thread):
    from engine.core.layout import Project

    project = Project.open(tmp_path_factory.mktemp("dist") / "proj", wan_model=tiny_models.wan)
    write_clips(project.clips_dir, count=4)
    return project


def _torchrun(run_toml: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "engine.training", "--config", str(run_toml), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(dist_project):
    double = write_run(dist_project, "two ranks", {**SETTINGS, "gradient_accumulation_steps": 1})
    result = _torchrun(double)  # first in this module: the cache is empty, the ranks split the encoding
    assert result.returncode == 0, result.stderr[-3000:]
    cached = [e["message"] for e in events_of(double, "progress")][-1]
    assert "4 items (3 files encoded" in cached  # rank 0's share of 4 clip latents + 2 captions
    assert len(list((dist_project.cache_dir / "latents").iterdir())) == 4
    single = write_run(dist_project, "one rank", {**SETTINGS, "gradient_accumulation_steps": 2})
    assert build_trainer(single).run() == 0

    # Single writer: every event once, in metrics.jsonl and on stdout alike.
    steps = events_of(double, "step")
    assert [e["step"] for e in steps] == list(range(1, 7))
    assert result.stdout.count('"event": "step"') == 6
    saves = [(e["kind"], e["step"]) for e in events_of(double, "save")]
    assert saves == [("state", 3), ("lora", 6), ("state", 6)]
    assert [e["phase"] for e in events_of(double, "phase")] == ["validate", "cache", "train", "done"]
    assert "2 x cpu" in events_of(double, "phase")[2]["message"]

    # Gradient averaging: the same loss curve and the same LoRA as one rank accumulating both micro-batches.
    one = {e["step"]: e["loss"] for e in events_of(single, "step")}
    for e in steps:
        assert e["loss"] == pytest.approx(one[e["step"]], rel=1e-4)
    expected, got = saved_lora(single.parent / "epoch3"), saved_lora(double.parent / "epoch3")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)

    # Resume on another GPU count: the 2-rank state of step 3, continued by one process with accumulation 2.
    moved = write_run(dist_project, "moved", {**SETTINGS, "gradient_accumulation_steps": 2})
    shutil.copytree(double.parent / "state" / "step3", moved.parent / "state" / "step3")
    from engine.training.stages import train

    assert train(moved, resume=True) == 0
    assert [e["step"] for e in events_of(moved, "step")] == [4, 5, 6]
    resumed = saved_lora(moved.parent / "epoch3")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-6)


def test_each_rank_gets_its_own_shard(dist_project):
    from engine.training.parallel import DataStream, World

    dataset = build_trainer(write_run(dist_project, "shards", SETTINGS)).dataset
    whole = DataStream(dataset, seed=42, batch_size=1, world=World())
    ranks = [DataStream(dataset, seed=42, batch_size=1, world=World(r, 2, r)) for r in range(2)]
    assert whole.per_epoch == 4 and [r.per_epoch for r in ranks] == [2, 2]
    assert all(len(stream.order(1)) == stream.per_epoch for stream in (whole, *ranks))  # one arithmetic
    for local in range(6):  # three epochs: rank r's local batch i is global batch i*2 + r, noise index too
        for r, stream in enumerate(ranks):
            assert stream.batch(local) == whole.batch(local * 2 + r)
            assert stream.global_index(local) == local * 2 + r
    first_epoch = sorted(i for stream in ranks for local in range(2) for i in stream.batch(local)[1])
    assert first_epoch == [0, 1, 2, 3]  # disjoint shards covering the epoch


def _counting_run(project, name: str, overrides: dict, repeats: int = 1) -> Path:
    """A run whose step count depends on everything the trainer counts: two size buckets per clip (two
    resolutions), so batches are cut per bucket; no max_steps cap."""
    from engine.training.config import load_dataset_config, save_dataset_config
    from engine.training.form import apply_overrides

    run_toml = write_run(project, name, {"epochs": 2, "checkpoint_every_n_epochs": None, **overrides})
    dataset_toml = run_toml.parent / "dataset.toml"
    dataset = apply_overrides(load_dataset_config(dataset_toml), {"resolutions": [32, 48]})
    dataset.directory[0].num_repeats = repeats
    save_dataset_config(dataset, dataset_toml)
    return run_toml


def test_preflight_counts_the_steps_the_trainer_takes(dist_project):
    """"Check dataset" and the trainer agree: GPU count, per-bucket micro-batches, accumulation, num_repeats."""
    from engine.training.check import preflight
    from engine.training.stages import load_configs, train

    # 4 clips x 2 buckets x 2 repeats: 8 per bucket, batches of 3 -> 3 + 3 = 6 micro-batches, 3 per rank on 2
    # ranks, 2 a step: 3 steps over 2 epochs (counting samples / (batch x accumulation) per epoch said 6).
    two_ranks = _counting_run(dist_project, "count two ranks",
                              {"micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, repeats=2)
    # 4 clips x 2 buckets: 4 per bucket, batches of 3 -> 2 + 2 = 4 micro-batches a step each: 8 steps (said 6).
    one_rank = _counting_run(dist_project, "count one rank",
                             {"micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1})
    result = _torchrun(two_ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train(one_rank) == 0
    for run_toml, gpus, expected in ((two_ranks, 2, 3), (one_rank, 1, 8)):
        check = preflight(*load_configs(run_toml), num_gpus=gpus)
        last = events_of(run_toml, "step")[-1]
        assert (last["step"], last["max_steps"]) == (expected, expected)
        assert check.total_steps == expected, (run_toml.parent.name, check.estimate())
    assert preflight(*load_configs(two_ranks), num_gpus=1).total_steps == 6  # one GPU takes twice the steps
