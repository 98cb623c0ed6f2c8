"""A tiny Bradley-Terry reward model for the quickstart task, to judge PPO rollouts.

``python -m aligner.quickstart.reward_model OUT_DIR`` trains a small ``LlamaForSequenceClassification``
on the bundled preference pairs with the Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))``
and saves it with the built-in tokenizer, ready for ``judge: {name: reward_model, path: OUT_DIR}``.
Texts are rendered as the ``plain`` template renders training rows (BOS, prompt, space, answer, EOS),
which is what the ``reward_model`` judge feeds it. (The project's reward-model trainer is the general
tool; this keeps the quickstart self-contained.)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from aligner.quickstart.task import DATA_DIR


def _encode(tokenizer, prompt: str, answer: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(f"{prompt} {answer}{tokenizer.eos_token}",
                                              add_special_tokens=False)["input_ids"]]


def _batch(tokenizer, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


def train_reward_model(out_dir: str | Path, steps: int = 150, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Train, save to ``out_dir``, and return held-out pair accuracy (share with r(chosen) > r(rejected))."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_builtin_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def load(name: str) -> list[dict]:
        return [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines()]

    def rewards(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = _batch(tokenizer, [_encode(tokenizer, r["prompt"], r[f]) for f in ("chosen", "rejected")
                                       for r in rows])
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        return scores[: len(rows)], scores[len(rows):]

    train_rows = load("preference_train.jsonl")
    model.train()
    for _ in range(steps):
        chosen, rejected = rewards(rng.sample(train_rows, batch_size))
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        chosen, rejected = rewards(load("preference_eval.jsonl"))
    accuracy = (chosen > rejected).float().mean().item()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"eval_accuracy": accuracy, "final_loss": loss.item()}


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart_reward_model"
    print(json.dumps(train_reward_model(target)))
