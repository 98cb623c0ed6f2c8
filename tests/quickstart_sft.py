"""A small model SFT'd on the quickstart task, for the label and PPO tests (each module trains it once)."""

from __future__ import annotations

import json

from .conftest import QUICKSTART_DATA, write_jsonl

SMALL = {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}}


def quickstart_rows(name: str, n: int) -> list[dict]:
    """The first ``n`` rows of a bundled quickstart file."""
    return [json.loads(line) for line in (QUICKSTART_DATA / name).read_text().splitlines()[:n]]


def train_sft_model(directory) -> str:
    """A small model taught the quickstart language (50/50 friendly/unfriendly) by a short SFT; its path."""
    from aligner.api import train

    config = {"output_dir": str(directory / "run"), "seed": 0, "model": SMALL, "tokenizer": "builtin",
              "stages": [{"name": "sft", "losses": [{"name": "sft"}],
                          "data": {"train": str(write_jsonl(directory / "sft.jsonl", quickstart_rows("sft_train.jsonl", 2000))),
                                   "template": "plain", "max_length": 48},
                          "eval": {"at_start": False},
                          "train": {"max_steps": 120, "batch_size": 32, "learning_rate": 3e-3,
                                    "lr_scheduler": "cosine", "warmup_ratio": 0.05}}]}
    return str(train(config).final_model_dir)


