"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo): sharded checkpoints, a SIGKILL, an exact
resume, one gathered final model; and a clear refusal where deepspeed is not installed.

accelerate (1.15) turns DeepSpeed on only where there are accelerators. DeepSpeed itself runs on CPUs
(its CPU accelerator, over gloo), so ``aligner.training.distributed.build_accelerator`` joins several
CPU processes with gloo and switches accelerate's state to DeepSpeed with the plugin that the
config's environment describes. This is the product's own path, end to end, through the shipped
accelerate configs: ``accelerator.prepare`` builds DeepSpeed's engine, the runner checkpoints every
process's ZeRO partitions, resume loads them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aligner.training.checkpoint_manifest import MARKER, verify_checkpoint

from .conftest import preference_rows
from .sharded_launch import launch_two, losses, ok

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'aligner-trainer[deepspeed]')")

def launch(tmp_path: Path, accelerate_config: Path, config: Path, out: Path, *extra: str,
           kill_at: int = 0) -> subprocess.CompletedProcess:
    """Two processes through ``accelerate launch`` with a shipped DeepSpeed config (on CPUs, in float32)."""
    return launch_two(tmp_path, accelerate_config, "DeepSpeedEngine", config, out, *extra, kill_at=kill_at)


_ok = ok


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_deepspeed_checkpoints_every_partition_and_a_killed_run_resumes_exactly(make_config, tmp_path, stage):
    accelerate_config = CONFIGS / f"deepspeed_zero{stage}.yaml"
    shipped = yaml.safe_load(accelerate_config.read_text())  # the shipped config is what the launches use
    assert shipped["distributed_type"] == "DEEPSPEED" and shipped["deepspeed_config"]["zero_stage"] == stage
    # 4 steps, checkpoints at 2 and 4; each step takes 4 rows on each of the 2 processes.
    config = make_config("dpo", rows=preference_rows(32),
                         train={"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "save_every": 2})
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))

    whole = _ok(launch(tmp_path, accelerate_config, path, tmp_path / "whole"))
    assert "needs GPUs" not in whole.stderr

    killed = launch(tmp_path, accelerate_config, path, tmp_path / "killed", kill_at=3)
    assert killed.returncode != 0, "the run was to be SIGKILLed at step 3"
    run_stage = tmp_path / "killed" / "dpo"
    assert not (run_stage / "final").exists()
    step2 = run_stage / "checkpoints" / "step-2"
    assert (step2 / MARKER).is_file() and not (run_stage / "checkpoints" / "step-4").exists()

    # The checkpoint holds both processes' partitions (DeepSpeed's files), and its manifest covers them all.
    listed = set(json.loads((step2 / MARKER).read_text())["files"])
    partitions = {p.relative_to(step2).as_posix() for p in (step2 / "deepspeed").rglob("*") if p.is_file()}
    optimizer_shards = {f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert optimizer_shards <= partitions <= listed
    if stage == 3:  # the weights are partitioned too
        assert {f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= partitions
    assert {"rng-rank0.pt", "rng-rank1.pt", "scheduler.pt", "trainer_state.json", "config.json"} <= listed
    assert not any(name.endswith(".safetensors") for name in listed), "a step checkpoint holds partitions, not full weights"
    assert verify_checkpoint(step2).status == "ok"
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["processes"] == 2 and state["sharded"] is True
    assert state["sharding"] == "deepspeed"

    resumed = _ok(launch(tmp_path, accelerate_config, path, tmp_path / "killed", "--resume"))
    assert "resumed from" in resumed.stderr and "step-2" in resumed.stderr

    # The resumed steps log the losses of the uninterrupted run's and the final weights match bit for
    # bit: same partitions, same optimizer state, same RNG and data position, deterministic gloo reductions.
    a, b = dict(losses(tmp_path / "whole")), dict(losses(tmp_path / "killed"))
    assert [s for s in sorted(b) if s > 2] == [3, 4]
    for step in (3, 4):
        assert a[step] == b[step], (step, a[step], b[step])
    final_a = load_file(str(tmp_path / "whole" / "dpo" / "final" / "model.safetensors"))
    final_b = load_file(str(run_stage / "final" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name

    # The final model is one HF-format directory of full (gathered) weights, loadable without DeepSpeed.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_stage / "final")
    weights = model.state_dict()
    for name, tensor in final_b.items():
        assert tensor.numel() > 0 and weights[name].shape == tensor.shape, name
    assert verify_checkpoint(run_stage / "final").status == "ok"
    assert verify_checkpoint(run_stage / "checkpoints" / "step-4").status == "ok"


@needs_deepspeed
def test_a_lora_run_under_zero2_checkpoints_without_the_frozen_base_and_resumes_exactly(make_config, tmp_path):
    """LoRA: the checkpoint holds the adapters' partitions, not another copy of the frozen base model
    (DeepSpeed's default would write it into every checkpoint), and the resume still matches."""
    accelerate_config = CONFIGS / "deepspeed_zero2.yaml"
    config = make_config("dpo", rows=preference_rows(32), peft={"name": "lora", "r": 4},
                         train={"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "save_every": 2})
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    _ok(launch(tmp_path, accelerate_config, path, tmp_path / "whole"))
    killed = launch(tmp_path, accelerate_config, path, tmp_path / "killed", kill_at=3)
    assert killed.returncode != 0
    step2 = tmp_path / "killed" / "dpo" / "checkpoints" / "step-2"
    model_states = step2 / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    assert model_states.is_file()
    saved = torch.load(model_states, weights_only=True)["module"]
    assert any("lora_A" in name for name in saved)
    frozen = [name for name in saved if "lora_" not in name and "lm_head" not in name]  # (the tied head is listed)
    assert frozen == [], frozen[:5]  # no base-layer weight: DeepSpeed's default wrote all of them
    _ok(launch(tmp_path, accelerate_config, path, tmp_path / "killed", "--resume"))
    a, b = dict(losses(tmp_path / "whole")), dict(losses(tmp_path / "killed"))
    for step in (3, 4):
        assert a[step] == b[step], (step, a[step], b[step])


# --- without deepspeed: a config error before anything is loaded or written ---------------------------


def test_a_deepspeed_launch_without_deepspeed_is_a_config_error_naming_the_accelerate_config(
        make_config, tmp_path, monkeypatch):
    from aligner.training import distributed

    monkeypatch.setattr(distributed, "deepspeed_available", lambda: False)
    monkeypatch.setattr(distributed, "_launch_config_file", lambda: "configs/accelerate/deepspeed_zero3.yaml")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ALIGNER_CACHE_DIR", str(tmp_path / "cache"))
    from aligner.cli import main

    config = make_config("dpo")
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["train", str(path), "--output-dir", str(out)]) == 2
    assert not out.exists()  # refused before the run directory was created


def test_the_deepspeed_refusal_names_the_config_file_of_the_launch(monkeypatch):
    from aligner.errors import ConfigError
    from aligner.training import distributed

    monkeypatch.setattr(distributed, "deepspeed_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setattr(distributed, "_launch_config_file", lambda: "configs/accelerate/deepspeed_zero2.yaml")
    with pytest.raises(ConfigError, match=r"accelerate config configs/accelerate/deepspeed_zero2.yaml: "
                                          r"'distributed_type: DEEPSPEED' \(zero_stage 2\) needs the deepspeed package"):
        distributed.check_deepspeed_installed()
    monkeypatch.setattr(distributed, "_launch_config_file", lambda: None)
    with pytest.raises(ConfigError, match="the accelerate config of this launch: .*pip install 'aligner-trainer\\[deepspeed\\]'"):
        distributed.check_deepspeed_installed()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    distributed.check_deepspeed_installed()  # no DeepSpeed asked for: nothing to refuse


def test_the_launch_config_file_is_read_from_the_launcher_command_line(monkeypatch, tmp_path):
    from aligner.training import distributed

    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"python\0-m\0accelerate.commands.launch\0--config_file\0ds.yaml\0train.py\0")
    real = Path

    def fake_path(name):
        return cmdline if str(name).startswith("/proc/") else real(name)

    monkeypatch.setattr(distributed, "Path", fake_path)
    assert distributed._launch_config_file() == "ds.yaml"
    cmdline.write_bytes(b"torchrun\0--nproc_per_node\0002\0train.py\0")
    assert distributed._launch_config_file() is None


def test_a_deepspeed_checkpoint_is_refused_by_a_run_without_deepspeed_and_the_other_way(tmp_path):
    from aligner.training.checkpoint_manifest import CheckpointError
    from aligner.training.resume import check_sharding_matches

    written = tmp_path / "step-2"
    (written / "deepspeed").mkdir(parents=True)
    check_sharding_matches(written, deepspeed=True)
    with pytest.raises(CheckpointError, match="written under DeepSpeed.*resume it with the DeepSpeed accelerate config"):
        check_sharding_matches(written, deepspeed=False)
    plain = tmp_path / "step-4"
    plain.mkdir()
    check_sharding_matches(plain, deepspeed=False)
    with pytest.raises(CheckpointError, match="not written under DeepSpeed, and this run uses DeepSpeed"):
        check_sharding_matches(plain, deepspeed=True)


def test_a_run_of_several_stages_under_zero3_is_refused_before_training(make_config, tmp_path, monkeypatch):
    from aligner.cli import main
    from aligner.errors import ConfigError
    from aligner.training import distributed

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setattr(distributed, "_launch_config_file", lambda: "configs/accelerate/deepspeed_zero3.yaml")
    with pytest.raises(ConfigError, match=r"deepspeed_zero3.yaml: DeepSpeed ZeRO-3 trains one stage per run, and "
                                          r"this run has 2 \('stages': sft, dpo\)"):
        distributed.check_stages_supported(["sft", "dpo"])
    distributed.check_stages_supported(["dpo"])  # one stage: fine
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    distributed.check_stages_supported(["sft", "dpo"])  # ZeRO-2 keeps whole weights in every process

    # A deepspeed_config_file names the stage in its JSON.
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json))
    assert distributed.deepspeed_zero_stage() == 3

    # Through the command: exit 2, nothing written.
    monkeypatch.setenv("ALIGNER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(distributed, "deepspeed_available", lambda: True)
    config = make_config("sft")
    config["stages"].append({**config["stages"][0], "name": "again"})
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["train", str(path), "--output-dir", str(out)]) == 2
    assert not out.exists()


POISON_LAUNCHER = '''
import sys

from aligner.cli import main
from aligner.plugins import temporary_plugin
from tests.test_faults_nonfinite import PoisonPlugin

with temporary_plugin(PoisonPlugin(), "poison"):
    sys.exit(main(sys.argv[1:]))
'''


@needs_deepspeed
@pytest.mark.parametrize(("stage", "mode"), [(2, "grad"), (3, "grad"), (3, "loss")])
def test_a_non_finite_step_under_deepspeed_is_skipped_and_counted(make_config, tmp_path, stage, mode):
    # mode "grad": the loss is finite, only DeepSpeed's check of its gradient partitions can see the inf.
    config = make_config("sft", steps=3)
    config["stages"][0]["losses"] = [{"name": "poisoned_sft", "bad_calls": [2], "mode": mode}]
    config["stages"][0]["train"].update({"save_every": 1, "max_grad_norm": None})
    path = tmp_path / "poison.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = tmp_path / "poison_launcher.py"
    launcher.write_text(POISON_LAUNCHER)
    env = {**os.environ, "ALIGNER_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIGS / f"deepspeed_zero{stage}.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", "0", str(launcher), "train", str(path), "--output-dir", str(out)]
    result = _ok(subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path))
    what = "loss" if mode == "loss" else "gradient"
    assert f"step 2: non-finite {what}, update skipped (1 skipped so far)" in result.stderr
    assert "DeepSpeed applied the update" not in result.stderr
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps_skipped"] for r in logged if "loss" in r] == [0, 1, 1]
    weights = load_file(str(out / "sft" / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    step2 = json.loads((out / "sft" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert step2["step"] == 2
