"""Mismatched prompt/completion pairs: the batch KTO estimates its KL reference point from.

Completions are rotated by one inside the batch, ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``
(the construction of the KTO paper and TRL), so the mismatched completions are the very set the
batch trains on, each paired with another prompt.
"""

from __future__ import annotations

from typing import Any

import torch


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(int(r.shape[0]) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def mismatched_batch(batch: dict[str, Any], pad_token_id: int = 0) -> dict[str, Any] | None:
    """The batch with each sequence's completion replaced by the previous sequence's (right-padded).

    ``None`` when the batch holds a single row (a preference pair counts as one row): then every
    rotation pairs a completion with its own prompt, and there is nothing mismatched to measure.
    """
    if int(torch.unique(batch["row_ids"]).numel()) < 2:
        return None
    ids, attention, completion = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    prompts = [ids[i][attention[i] & ~completion[i]] for i in range(ids.shape[0])]
    completions = [ids[i][completion[i]] for i in range(ids.shape[0])]
    rotated = completions[-1:] + completions[:-1]
    sequences = [torch.cat([p, c]) for p, c in zip(prompts, rotated, strict=True)]
    ones = [torch.ones_like(s) for s in sequences]
    masks = [torch.cat([torch.zeros_like(p), torch.ones_like(c)]) for p, c in zip(prompts, rotated, strict=True)]
    return {
        "input_ids": _pad(sequences, pad_token_id),
        "attention_mask": _pad(ones, 0),
        "completion_mask": _pad(masks, 0),
        "prompt_lengths": torch.tensor([p.shape[0] for p in prompts], device=ids.device),
        "row_ids": batch["row_ids"],
    }
