"""Launching ``aligner train`` as two CPU processes through ``accelerate launch`` (gloo), optionally
SIGKILLed at the end of a step: what the FSDP and DeepSpeed tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAUNCHER = '''
import os
import signal
import sys

import aligner
from aligner.cli import main
from aligner.plugins import temporary_plugin

WRAPPER = os.environ["EXPECTED_WRAPPER"]


class KillAt:
    """A real SIGKILL of every process at the end of a step: no handler, no cleanup, no final save."""

    def __init__(self, step):
        self.step = step

    @aligner.hookimpl
    def on_step_end(self, run, step, metrics):
        assert type(run.model).__name__.startswith(WRAPPER), type(run.model)  # really sharded
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
with temporary_plugin(KillAt(kill_at), "killer"):
    sys.exit(main(sys.argv[1:]))
'''


def launch_two(tmp_path: Path, accelerate_config: Path, wrapper: str, config: Path, out: Path, *extra: str,
               kill_at: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """``aligner train config --output-dir out`` as two processes with ``accelerate_config`` (float32);
    every step checks the prepared model's class name starts with ``wrapper``."""
    launcher = tmp_path / "sharded_launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "ALIGNER_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "KILL_AT_STEP": str(kill_at), "PYTHONPATH": str(ROOT),
           "EXPECTED_WRAPPER": wrapper}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
               str(launcher), "train", str(config), "--output-dir", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result``, asserting the launch succeeded (its stderr's end otherwise)."""
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def losses(out: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every training step a run logged."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]
