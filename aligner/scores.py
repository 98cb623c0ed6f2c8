"""Scalar scores from a sequence-classification model (``num_labels=1``): the reward forward.

The model scores each sequence at its last non-padding token (transformers finds it from
``config.pad_token_id``), so the batch must be right-padded with the tokenizer's pad token, as
``collate`` does.
"""

from __future__ import annotations

from typing import Any

import torch


def sequence_scores(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """One score per sequence of the batch, shape ``[N]``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    if logits.shape[-1] != 1:
        raise ValueError(f"a reward model must have one output label, this one has {logits.shape[-1]}")
    return logits.squeeze(-1)
