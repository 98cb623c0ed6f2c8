"""Two CPU processes (torchrun, gloo) give the same training as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import preference_rows


def launch(config_path, out, processes: int, cache_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGNER_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if processes == 1:
        command = [sys.executable, "-m", "aligner", "train", str(config_path), "--output-dir", str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "-m", "aligner", "train", str(config_path), "--output-dir", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def step_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def eval_metrics(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/")}) for r in records if "eval/loss" in r]


def test_two_processes_match_one_process_with_the_same_global_batch(make_config, tmp_path):
    # One process: micro-batches of 4 rows, 2 per step. Two processes: one micro-batch of 4 rows
    # each per step. Both consume the same global order of sampler batches, 8 rows per step.
    # Eval batches of 3 rows: 3 batches, so one process scores 2 and the other 1 plus a repeat that counts for nothing.
    base = make_config("dpo", rows=preference_rows(32), eval_rows=preference_rows(8),
                       train={"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "gradient_accumulation_steps": 2,
                              "save_every": 3}, eval={"batch_size": 3})
    single_cfg, double_cfg = tmp_path / "one.yaml", tmp_path / "two.yaml"
    single_cfg.write_text(yaml.safe_dump(base))
    base["stages"][0]["train"]["gradient_accumulation_steps"] = 1
    double_cfg.write_text(yaml.safe_dump(base))

    one = launch(single_cfg, tmp_path / "one", 1, tmp_path / "cache-one")
    two = launch(double_cfg, tmp_path / "two", 2, tmp_path / "cache-two")

    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    # Held-out metrics: the eval set is split between the processes and the sums pooled, so they
    # equal the single process's, which scores every batch.
    ea, eb = eval_metrics(tmp_path / "one"), eval_metrics(tmp_path / "two")
    assert [step for step, _ in ea] == [step for step, _ in eb] == [0, 3]
    for (_, x), (_, y) in zip(ea, eb, strict=True):
        assert set(x) == set(y) and all(x[k] == pytest.approx(y[k], abs=1e-5) for k in x), (x, y)
    assert [s for s, _ in b] == [1, 2, 3], "each step must be logged exactly once (main process only)"
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    wa = load_file(str(tmp_path / "one" / "dpo" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "dpo" / "final" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # The reference cache (train and eval) is computed once, by the main process, not once per process.
    assert two.stderr.count("cached reference log-probs of") == 2, two.stderr[-2000:]
    assert "from the cache" in two.stderr  # the second process read the entries the first one wrote
    assert one.stderr.count("cached reference log-probs of") == 2
    # Under DDP the pairs still run with their prompt once (as the wrapper's forward, so gradients
    # sync: the weights above match).
    assert "each preference pair runs as one row holding its prompt once" in two.stderr
    assert sorted(p.name for p in (tmp_path / "two" / "dpo" / "checkpoints").iterdir()) == ["step-3"]


def test_an_fsdp_launch_on_cpus_says_it_runs_as_data_parallel(monkeypatch, caplog):
    import logging

    from aligner.training.distributed import multi_process_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert multi_process_cpu()
    assert "FSDP needs GPUs: on CPUs the 2 processes run as data parallel over gloo" in caplog.text
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert multi_process_cpu()
    assert caplog.text == ""
