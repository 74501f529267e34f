"""What a trainer does with damaged or half-written saves, changed optimizer settings, a second trainer on the same
run or GPU (from a terminal and from the studio), and `--check`: each through the real command or train()."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import torch

from engine.jobs import JobRunner, training_argv
from engine.training.events import StepEvent
from engine.training.state import StateDamagedError, load_training_state
from tests.engine import test_train
from tests.engine.test_files import kill_a_writer
from tests.engine.test_train import REPO, events_of, run_cli, write_clips, write_run

train_project = test_train.train_project  # a project with two captioned clips (module scope: built once here)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logs(run_toml) -> list[str]:
    return [e["message"] for e in events_of(run_toml, "log")]


def test_resume_skips_a_damaged_newest_state_and_clears_killed_saves(train_project):
    from engine.training.stages import train

    settings = {"epochs": 100, "studio.state_every_n_steps": 2, "save_every_n_epochs": 100}
    run_toml = write_run(train_project, "damaged", {**settings, "max_steps": 4})
    assert train(run_toml) == 0
    state_root = run_toml.parent / "state"
    assert sorted(p.name for p in state_root.iterdir()) == ["step2", "step4"]
    optimizer_file = state_root / "step4" / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[: optimizer_file.stat().st_size // 2])  # a truncated copy
    kill_a_writer("dir", state_root / "step6")  # saves killed mid-way: a state, a LoRA, a cache file
    kill_a_writer("file", run_toml.parent / "epoch3" / "adapter_model.safetensors")
    kill_a_writer("file", train_project.cache_dir / "latents" / "killed.safetensors")

    write_run(train_project, "damaged", {**settings, "max_steps": 6})
    assert train(run_toml, resume=True) == 0
    damaged = next(m for m in logs(run_toml) if "is damaged" in m)
    assert str(state_root / "step4") in damaged and "optimizer.safetensors" in damaged  # names both states
    assert f"resuming from {state_root / 'step2'} instead" in damaged
    steps = [e["step"] for e in events_of(run_toml, "step")]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3 and 4 again, from step 2's state
    assert len(list(state_root.glob("step4.damaged-*"))) == 1  # kept aside, not deleted
    assert sorted(p.name for p in state_root.iterdir() if p.name.startswith("step")
                  and "." not in p.name) == ["step4", "step6"]
    assert sum("left by a save that was killed" in m for m in logs(run_toml)) == 2
    for folder in (run_toml.parent, train_project.cache_dir):
        assert not [p for p in folder.rglob(".*") if ".tmp" in p.name]


def test_any_changed_byte_of_a_state_is_named(train_project, tmp_path):
    from engine.training.stages import train

    run_toml = write_run(train_project, "bit flip", {"max_steps": 2, "epochs": 100, "studio.state_every_n_steps": 2})
    assert train(run_toml) == 0
    lora_file = run_toml.parent / "state" / "step2" / "lora.safetensors"
    data = bytearray(lora_file.read_bytes())
    data[-3] ^= 0x10  # one flipped bit inside a tensor: still a valid safetensors file
    lora_file.write_bytes(bytes(data))
    with pytest.raises(StateDamagedError, match="lora.safetensors is damaged"):
        load_training_state(lora_file.parent)
    assert train(run_toml, resume=True) == 2  # the only state is damaged: a clear error, nothing trained
    error = events_of(run_toml, "error")[-1]
    assert "No readable saved state" in error["message"] and "without --resume" in error["hint"]


def test_optimizer_settings_changed_before_resume_take_effect(train_project):
    from engine.training.stages import train

    settings = {"epochs": 100, "studio.state_every_n_steps": 2}
    run_toml = write_run(train_project, "new betas", {**settings, "max_steps": 2})
    assert train(run_toml) == 0
    write_run(train_project, "new betas", {**settings, "max_steps": 4, "optimizer.betas": [0.8, 0.9],
                                           "optimizer.eps": 1e-6, "optimizer.weight_decay": 0.05,
                                           "optimizer.lr": 5e-4})
    assert train(run_toml, resume=True) == 0
    changed = [m for m in logs(run_toml) if m.startswith("Optimizer") and "changed in the run file" in m]
    assert [m.split()[1] for m in changed] == ["betas", "eps", "weight_decay", "lr"]
    assert "[0.9, 0.99] in the saved state, [0.8, 0.9] from now on" in changed[0]
    group = load_training_state(run_toml.parent / "state" / "step4").optimizer["param_groups"][0]
    assert tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6 and group["weight_decay"] == 0.05


def test_resume_refuses_another_optimizer():
    from engine.training.optim import optimizer_record, resume_optimizer
    from engine.training.schema import OptimizerConfig

    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params)
    record = {**optimizer_record(optimizer, OptimizerConfig()), "class": "bitsandbytes.optim.adamw.AdamW8bit",
              "type": "adamw8bit"}
    with pytest.raises(ValueError, match="type = 'adamw8bit'.*now asks for 'adamw_optimi'"):
        resume_optimizer(optimizer, OptimizerConfig(), optimizer.state_dict(), record)


# ----------------------------------------------------------------------------------- one trainer per run and GPU

def first_step(process: subprocess.Popen) -> None:
    for line in process.stdout:
        if line.startswith("{") and json.loads(line).get("event") == "step":
            return
    raise AssertionError(f"the trainer ended before its first step (exit {process.wait()})")


def refusal(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    errors = [json.loads(line) for line in output.splitlines() if line.startswith('{"event": "error"')]
    return errors[-1]["message"]


def test_a_second_trainer_on_the_run_or_the_gpu_is_refused(train_project, tmp_path):
    home = {"WAN_STUDIO_HOME": str(tmp_path / "home")}
    run_toml = write_run(train_project, "one trainer", {"max_steps": 100000, "epochs": 100000})
    other_toml = write_run(train_project, "another run", {"max_steps": 2})
    first = run_cli(["--config", str(run_toml)], env=home)
    try:
        first_step(first)
        same_run = run_cli(["--config", str(run_toml), "--resume"], env=home)
        same_gpu = run_cli(["--config", str(other_toml)], env=home)  # both start at once: start-up is the slow part
        message = refusal(same_run)
        assert str(run_toml.parent) in message and f"pid {first.pid}" in message
        message = refusal(same_gpu)  # the lock's word is "GPU", or "CPU" on a machine without one
        assert "training run 'one trainer' is using the " in message and f"pid {first.pid}" in message
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0 and events_of(run_toml, "phase")[-1]["phase"] == "stopped"
    assert events_of(run_toml, "error") == []  # the refused trainer wrote nothing into the running run's folder
    assert not (other_toml.parent / "metrics.jsonl").exists()


def test_a_trainer_started_by_the_studio_uses_the_gpu_lock_it_holds(train_project, tmp_path):
    home = tmp_path / "home"
    runner = JobRunner(home / "jobs")  # the studio's runner: its supervisor holds the GPU lock for the trainer
    run_toml = write_run(train_project, "from the studio", {"max_steps": 100000, "epochs": 100000})
    env = {"WAN_STUDIO_HOME": str(home), "OMP_NUM_THREADS": "1"}
    job = runner.start("from the studio", training_argv(run_toml), cwd=REPO, run_dir=run_toml.parent, env=env,
                       description="training run 'from the studio'", watches_stop_request=True)
    try:
        next(e for e in job.follow() if isinstance(e, StepEvent))  # it trains: no deadlock on its own lock
        message = refusal(run_cli(["--config", str(write_run(train_project, "terminal", {"max_steps": 2}))],
                                  env={"WAN_STUDIO_HOME": str(home)}))
        assert "training run 'from the studio' is using the " in message and f"pid {job.record.pid}" in message
    finally:
        status = runner.stop(job, grace_s=120)
    assert status.state == "stopped", status.log_tail
    assert runner.gpu_holder() is None


def test_check_runs_the_dataset_check_alone(train_project, tmp_path):
    from engine.core.layout import Project

    good = run_cli(["--config", str(write_run(train_project, "checked", {"max_steps": 2})), "--check"])
    output, _ = good.communicate(timeout=120)
    assert good.returncode == 0 and "2 clips" in output and "Ready to train." in output
    assert not (train_project.run_dir("checked") / "metrics.jsonl").exists()  # nothing trained, nothing written

    project = Project.open(tmp_path / "missing caption", wan_model=train_project.settings().wan_model)
    write_clips(project.clips_dir)
    (project.clips_dir / "clip 1.txt").unlink()
    bad = run_cli(["--config", str(write_run(project, "checked", {"max_steps": 2})), "--check"])
    output, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "error: " in output and "clip 1" in output
