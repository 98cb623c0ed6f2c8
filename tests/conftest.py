"""Shared fixtures: tiny configs and data written to a temporary directory, nothing from a hub."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The reference cache of a test session never touches the user's ~/.cache.
os.environ.setdefault("ALIGNER_CACHE_DIR", tempfile.mkdtemp(prefix="aligner-test-cache-"))

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = ROOT / "aligner" / "quickstart" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON Lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_model() -> dict:
    """A very small Llama spec: trains in well under a second per step on a CPU."""
    return {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}}


def preference_rows(n: int = 16) -> list[dict]:
    """Quickstart-style preference rows."""
    rows = [json.loads(line) for line in (QUICKSTART_DATA / "preference_train.jsonl").read_text().splitlines()]
    return rows[:n]


def sft_rows(n: int = 16) -> list[dict]:
    """Quickstart-style SFT rows."""
    rows = [json.loads(line) for line in (QUICKSTART_DATA / "sft_train.jsonl").read_text().splitlines()]
    return rows[:n]


@pytest.fixture
def make_config(tmp_path: Path):
    """Build a one-stage run config dict over rows written to ``tmp_path``.

    ``make_config("dpo", rows=..., **stage_overrides)``; the loss name picks preference or SFT rows.
    """

    def build(loss: str = "dpo", rows: list[dict] | None = None, eval_rows: list[dict] | None = None,
              steps: int = 2, **stage: object) -> dict:
        preference = loss not in ("sft",)
        rows = rows if rows is not None else (preference_rows() if preference else sft_rows())
        train = write_jsonl(tmp_path / f"{loss}_train.jsonl", rows)
        data = {"train": str(train), "template": "plain", "max_length": 48}
        if eval_rows is not None:
            data["eval"] = str(write_jsonl(tmp_path / f"{loss}_eval.jsonl", eval_rows))
        config = {
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "model": tiny_model(),
            "tokenizer": "builtin",
            "stages": [{
                "name": loss,
                "data": data,
                "losses": [{"name": loss}],
                "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 1e-3},
                **stage,
            }],
        }
        return config

    return build
