"""The benchmark script runs end to end at tiny sizes and its cross-check holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "dpo_vs_trl.py"), "--quick", "--skip-memory",
                             "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(a) aligner" in result.stdout and "(c)" in result.stdout
    numbers = json.loads(out.read_text())
    # the same maths as TRL: per-step losses agree on the same batches
    assert numbers["max_step_loss_diff_b"] < 1e-4
    assert len(numbers["aligner_losses"]) == numbers["steps"] == len(numbers["trl_precompute_losses"])
    assert numbers["warm_reference_passes"] == 0  # the warm run reads every reference value from the cache
    assert all(numbers[k] > 0 for k in ("floor_s", "aligner_cold_s", "aligner_warm_s", "trl_default_s"))


def test_grpo_benchmark_quick_run(tmp_path):
    """Both trainers generate exactly the same number of completions and tokens, and a ratio comes out."""
    out = tmp_path / "grpo.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "grpo_vs_trl.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio aligner/TRL" in result.stdout
    numbers = json.loads(out.read_text())
    assert numbers["aligner"]["mean_length"] == numbers["trl"]["mean_length"] == numbers["spec"]["max_new_tokens"]
    assert numbers["aligner"]["completions"] == numbers["trl"]["completions"] == 32  # 2 steps x 2 prompts x 8
    assert numbers["ratio_completions_per_s"] > 0


def test_data_scale_benchmark_small_run(tmp_path):
    """The data benchmark runs; both sides tokenize every row, and the warm run reads aligner's cache."""
    out = tmp_path / "scale.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "data_scale.py"), "--rows", "500", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(out.read_text())["500"]
    assert cases["aligner cold"]["examples"] == cases["aligner warm"]["examples"] == 500
    assert cases["aligner warm"]["cpu_s"] < cases["aligner cold"]["cpu_s"]


def test_real_size_benchmark_quick_run(tmp_path):
    """The Qwen2.5-0.5B-shaped benchmark runs end to end at tiny sizes (each case in its own process)
    and prints aligner/TRL ratios for DPO, SFT and long-context DPO."""
    out = tmp_path / "real_size.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "real_size.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ratio aligner/TRL") == 3
    numbers = json.loads(out.read_text())
    for ratio in numbers["main_ratios"] + numbers["long_ratios"]:
        assert ratio["time_ratio"] > 0 and ratio["memory_ratio"] > 0
    for row in list(numbers["main"].values()) + list(numbers["long"].values()):
        assert row["peak_mib"] > 0 and row["s_per_step"] > 0
