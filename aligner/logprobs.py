"""Completion log-probabilities from one causal-LM forward pass.

Only positions that predict a completion token are needed. The forward asks the model for logits
from the first completion position of the batch onward (``logits_to_keep``), so the prompt part
of most sequences never gets a full-vocabulary projection; ``selective_log_softmax`` (from trl)
then gathers the target tokens' log-probs without materialising a second vocabulary-sized tensor.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from trl.trainer.utils import selective_log_softmax

from aligner.protocols import SequenceLogProbs


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost model whose ``forward`` declares its arguments (DDP and peft wrap it)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


@functools.lru_cache(maxsize=32)
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def completion_logprobs(model: torch.nn.Module, batch: dict[str, Any], token_level: bool = False) -> SequenceLogProbs:
    """Sum of log-probs of each sequence's completion tokens (and per-token values if asked)."""
    input_ids = batch["input_ids"]
    completion_mask = batch["completion_mask"]
    length = input_ids.shape[1]
    # Position t predicts token t+1, so the first needed logit is one before the earliest completion token.
    start = max(int(batch["prompt_lengths"].min()) - 1, 0)
    keep = length - start
    kwargs: dict[str, Any] = {"use_cache": False}
    trimmed = _accepts_logits_to_keep(type(_unwrap(model)))
    if trimmed:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], **kwargs).logits
    # Count positions from the end: prompt tuning and P-tuning prepend virtual tokens, so the logits
    # can be longer than input_ids, and the real positions are always the last ones.
    logits = logits[:, logits.shape[1] - keep:]
    logits = logits[:, :-1]
    targets = input_ids[:, start + 1:]
    mask = completion_mask[:, start + 1:].to(logits.dtype if logits.is_floating_point() else torch.float32)
    token_logps = selective_log_softmax(logits, targets).float() * mask.float()
    return SequenceLogProbs(
        logps=token_logps.sum(-1),
        num_tokens=completion_mask.sum(-1),
        token_logps=token_logps if token_level else None,
        mask=mask.bool() if token_level else None,
    )
