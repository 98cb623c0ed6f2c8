"""FSDP2 on two CPU processes (gloo): sharded checkpoints, a SIGKILL, an exact resume, one gathered final model.

accelerate (1.15) turns FSDP on only where there are accelerators: ``Accelerator(cpu=True)`` gives
plain multi-CPU data parallel even when launched with the FSDP config. torch's FSDP2 itself runs on
gloo, so aligner (``aligner.training.distributed.build_accelerator``) switches accelerate's state to FSDP with the plugin
that the config's environment describes (``FSDP_VERSION=2``, ...) when several CPU processes ask for
FSDP2. This is the product's own path, end to end: ``accelerator.prepare`` shards the model with
``fully_shard``, the runner checkpoints every process's shard, resume loads them.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aligner.training.checkpoint_manifest import MARKER, verify_checkpoint

from .conftest import preference_rows
from .sharded_launch import launch_two, losses, ok

ROOT = Path(__file__).resolve().parent.parent
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"

def launch(tmp_path: Path, config: Path, out: Path, *extra: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    """Two processes through ``accelerate launch`` with the shipped FSDP config (on CPUs, in float32)."""
    return launch_two(tmp_path, FSDP_CONFIG, "FSDP", config, out, *extra, kill_at=kill_at, timeout=300)


_ok = ok


def test_fsdp2_checkpoints_every_shard_and_a_killed_run_resumes_exactly(make_config, tmp_path):
    fsdp = yaml.safe_load(FSDP_CONFIG.read_text())  # the shipped config is what the launches use
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    # 4 steps, checkpoints at 2 and 4; each step takes 4 rows on each of the 2 processes.
    config = make_config("dpo", rows=preference_rows(32),
                         train={"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "save_every": 2})
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))

    whole = _ok(launch(tmp_path, path, tmp_path / "whole"))
    assert "needs GPUs" not in whole.stderr  # FSDP2 shards on CPUs: no data-parallel fallback warning

    killed = launch(tmp_path, path, tmp_path / "killed", kill_at=3)
    assert killed.returncode != 0, "the run was to be SIGKILLed at step 3"
    stage = tmp_path / "killed" / "dpo"
    assert not (stage / "final").exists()
    step2 = stage / "checkpoints" / "step-2"
    assert (step2 / MARKER).is_file() and not (stage / "checkpoints" / "step-4").exists()

    # The checkpoint holds both processes' shards, and its manifest covers every one of them.
    listed = set(json.loads((step2 / MARKER).read_text())["files"])
    shards = {p.relative_to(step2).as_posix() for p in (step2 / "sharded").iterdir()}
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= shards <= listed
    assert {"rng-rank0.pt", "rng-rank1.pt", "scheduler.pt", "trainer_state.json", "config.json"} <= listed
    assert not any(name.endswith(".safetensors") for name in listed), "a step checkpoint holds shards, not full weights"
    assert verify_checkpoint(step2).status == "ok"
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["processes"] == 2 and state["sharded"] is True

    resumed = _ok(launch(tmp_path, path, tmp_path / "killed", "--resume"))
    assert "resumed from" in resumed.stderr and "step-2" in resumed.stderr

    # The resumed steps log the losses of the uninterrupted run's, and the final weights match bit for bit:
    # same shards, same optimizer state, same RNG and data position, and gloo's reductions are deterministic.
    a, b = dict(losses(tmp_path / "whole")), dict(losses(tmp_path / "killed"))
    assert [s for s in sorted(b) if s > 2] == [3, 4]
    for step in (3, 4):
        assert a[step] == b[step], (step, a[step], b[step])
    final_a = load_file(str(tmp_path / "whole" / "dpo" / "final" / "model.safetensors"))
    final_b = load_file(str(stage / "final" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name

    # The final model is one HF-format directory of full (gathered) weights, loadable without FSDP.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stage / "final")
    for name, tensor in model.state_dict().items():
        if name in final_b:
            assert tensor.shape == final_b[name].shape, name
    assert verify_checkpoint(stage / "final").status == "ok"
    assert verify_checkpoint(stage / "checkpoints" / "step-4").status == "ok"


# --- the sharded writer on one process (no launch): its atomicity and manifest -----------------------


def _write(target: Path, model: torch.nn.Module, shard_files: dict[str, bytes], fail: str | None = None) -> Path:
    from aligner.training.checkpoint_writing import write_sharded_atomically

    def write_shard(directory: Path) -> None:
        for name, data in shard_files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        if fail == "shard":
            raise OSError(28, "No space left on device")

    def write_main(directory: Path) -> None:
        if fail == "main":
            raise OSError(28, "No space left on device")
        (directory / "trainer_state.json").write_text("{}")

    return write_sharded_atomically(target, model, True, write_shard, write_main)


def test_a_sharded_checkpoint_lists_every_shard_and_a_failed_write_keeps_the_previous_one(tmp_path):
    from aligner.training.checkpoint_manifest import CheckpointError

    model = torch.nn.Linear(2, 2)
    first = _write(tmp_path / "checkpoints" / "step-2", model, {"sharded/__0_0.distcp": b"a", "rng-rank0.pt": b"r"})
    files = json.loads((first / MARKER).read_text())["files"]
    assert set(files) == {"sharded/__0_0.distcp", "rng-rank0.pt", "trainer_state.json"}
    assert verify_checkpoint(first).status == "ok"

    for where in ("shard", "main"):
        target = tmp_path / "checkpoints" / "step-4"
        with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact.*step-2"):
            _write(target, model, {"sharded/__0_0.distcp": b"b"}, fail=where)
        assert not target.exists() and not (target.parent / ".tmp-step-4").exists()
    assert verify_checkpoint(first).status == "ok"


def test_a_sharded_checkpoint_with_a_non_finite_weight_is_refused(tmp_path):
    from aligner.training.guards import NonFiniteError

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to write .*step-2.*weight"):
        _write(tmp_path / "step-2", model, {"sharded/__0_0.distcp": b"a"})
    assert not (tmp_path / "step-2").exists()


def test_fsdp_refuses_a_run_of_several_stages_before_anything_is_written(make_config, tmp_path):
    """After an FSDP stage the weights are shards: the next stage's reference cannot be built on them
    (it failed inside the second stage, with a traceback). Refused at start, naming the config."""
    config = make_config("dpo", rows=preference_rows(16), train={"max_steps": 2, "batch_size": 4})
    sft = copy.deepcopy(config["stages"][0])
    sft.update(name="sft", losses=[{"name": "sft"}])
    config["stages"].insert(0, sft)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    result = launch(tmp_path, path, tmp_path / "out")
    assert result.returncode != 0
    assert (f"the accelerate config {FSDP_CONFIG}: FSDP trains one stage per run, and this run has 2 "
            "('stages': sft, dpo)") in result.stderr
    children = result.stderr.split("torch/distributed/elastic")[0]  # before the launcher's own report
    assert "aligner: error:" in children and "Traceback" not in children
    assert not (tmp_path / "out").exists()  # nothing written
