"""Two processes of one script started at the same moment (what the data caches' lock tests share)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_two_together(tmp_path: Path, script: str, args: list[str], env: dict[str, str]) -> list[Any]:
    """Run ``script`` (its text) twice with ``args``; each process writes ``<args[-1]>.<pid>`` when it is
    ready and waits for the file ``args[-1]`` (the go signal), so both start their work together.
    Returns what each printed last, as JSON, after asserting both succeeded."""
    path, go = tmp_path / "worker.py", Path(args[-1])
    path.write_text(script)
    workers = [subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **env}, cwd=ROOT)
               for _ in range(2)]
    deadline = time.monotonic() + 120
    while (len(list(go.parent.glob(f"{go.name}.*"))) < 2 and time.monotonic() < deadline
           and all(w.poll() is None for w in workers)):
        time.sleep(0.05)
    go.write_text("")
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
