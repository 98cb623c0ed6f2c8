"""Loss aggregation: how per-token losses become the one scalar of an optimizer step.

The modes, named as verl's ``loss_agg_mode`` names them:

- ``token-mean``: the sum of every token's loss / the number of tokens in the step;
- ``seq-mean-token-mean``: the mean over sequences of each sequence's mean token loss (the GRPO
  paper, Shao et al. 2024): short completions weigh as much as long ones;
- ``seq-mean-token-sum``: the mean over sequences of each sequence's summed token loss;
- ``seq-mean-token-sum-norm``: the sum of every token's loss / (sequences * ``norm_length``), a
  constant, usually the maximum completion length (Dr. GRPO, Liu et al. 2025): no length bias.

An optimizer step usually spans several micro-batches (gradient accumulation) and several
processes. Averaging each micro-batch's mean would weigh a token by how full its micro-batch was;
instead the normalisers are counted over the whole step first (``step_counts``) and each token gets
a fixed weight (``token_weights``), so the summed gradient is the same however the step is split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm")
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class StepCounts:
    """Totals of one optimizer step over all its micro-batches and all processes."""

    tokens: float  # masked (completion) tokens
    sequences: float  # rows with at least one masked token


def step_counts(masks: list[Tensor], all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> StepCounts:
    """Count the tokens and non-empty sequences of a step's micro-batch ``masks`` (``[N, T]`` each).

    ``all_reduce_sum`` sums a tensor over processes (``None``: one process). Every process must call
    this once per step, as it is a collective.
    """
    device = masks[0].device if masks else torch.device("cpu")
    # float64: exact counts far beyond what float32 holds, and one reduce for both numbers.
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for mask in masks:
        mask = mask.bool()
        # An empty row (a completion of no tokens) contributes no loss, so it is not a sequence:
        # counting it would shrink every other sequence's weight.
        counts += torch.stack([mask.sum(), mask.any(dim=-1).sum()]).to(torch.float64)
    if all_reduce_sum is not None:
        counts = all_reduce_sum(counts)
    tokens, sequences = counts.tolist()
    return StepCounts(tokens=tokens, sequences=sequences)


def token_weights(mask: Tensor, mode: str, counts: StepCounts, norm_length: float | None = None) -> Tensor:
    """Per-token weights ``[N, T]`` (float32, 0 outside ``mask``) of one micro-batch.

    ``sum(weights * per_token_loss)``, summed over every micro-batch of the step on every process,
    is the loss aggregated by ``mode``. Positions outside ``mask`` get weight 0, so the loss there
    must be finite (``0 * inf`` is NaN).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")
    weights = mask.to(torch.float32)
    # A step with no tokens at all has a zero loss; the clamps keep it 0 rather than NaN.
    tokens, sequences = max(counts.tokens, 1.0), max(counts.sequences, 1.0)
    if mode == "token-mean":
        return weights / tokens
    if mode == "seq-mean-token-mean":
        lengths = weights.sum(dim=-1, keepdim=True).clamp(min=1)
        return weights / (lengths * sequences)
    if mode == "seq-mean-token-sum":
        return weights / sequences
    if norm_length is None or norm_length <= 0:
        raise ValueError(f"loss aggregation {mode!r} needs a positive norm_length (e.g. the max completion length)")
    return weights / (sequences * norm_length)


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, norm_length: float | None = None) -> Tensor:
    """The scalar loss of one micro-batch that is a whole step on one process, aggregated by ``mode``."""
    weights = token_weights(mask, mode, step_counts([mask]), norm_length)
    return (weights * per_token_loss).sum()
