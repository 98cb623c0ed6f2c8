"""The clipped policy-gradient surrogate, per token, and the KL penalty as a loss term.

``policy_gradient_loss`` is PPO's objective (Schulman et al., 2017) with the variants that online
methods add: separate lower and upper clip ranges (DAPO's clip-higher, Yu et al. 2025), a dual clip
bounding the loss of negative-advantage tokens (Ye et al., 2020), and a sequence-level importance
ratio (GSPO, Zheng et al. 2025). Losses are returned per token; ``aligner.online.aggregation`` turns
them into the scalar of an optimizer step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from aligner.online.advantages import masked_mean
from aligner.online.kl import kl_estimator


def policy_gradient_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate ``max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))``, with metrics.

    All inputs are ``[N, T]``; ``r = pi / pi_old``. ``ratio_level="sequence"`` uses for every token
    of row ``i`` the ratio ``exp(mean of its masked log-ratios)`` (GSPO); ``dual_clip=c`` additionally
    caps the loss of tokens with ``A < 0`` at ``-A * c``.

    The loss is NOT multiplied by ``mask``: positions outside it hold finite but meaningless values,
    to be weighted by the caller (``aggregation.token_weights``, or a masked mean). That keeps the
    default path the exact operations of the PPO implementation, so its results stay bit-identical.
    Metrics are masked means over this micro-batch, without gradient.
    """
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    token_log_ratio = logps - old_logps
    if ratio_level == "token":
        log_ratio = token_log_ratio
    else:
        # GSPO: one length-normalised ratio per sequence; its gradient reaches every token of it.
        weights = mask.to(logps.dtype)
        seq_log_ratio = (token_log_ratio * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1)
        log_ratio = seq_log_ratio[:, None].expand_as(logps)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # The pessimistic (larger) loss: clipping only ever removes the incentive to move further.
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        # With A < 0 and a huge ratio, -A * r is unbounded: one stale token could dominate the step.
        bound = -advantages * dual_clip
        dual_taken = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)

    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "clip_fraction_low": masked_mean(((ratio < 1.0 - clip_low) & (advantages < 0)).float(), mask),
            "clip_fraction_high": masked_mean(((ratio > 1.0 + clip_high) & (advantages > 0)).float(), mask),
            # How far this update moved from the sampling policy: the k3 form the PPO implementations
            # log as approx_kl, per token even for GSPO (a second-order estimate of the KL either way).
            "approx_kl": masked_mean(torch.expm1(-token_log_ratio) + token_log_ratio, mask),
        }
        if dual_clip is not None:
            metrics["dual_clip_fraction"] = masked_mean(dual_taken.float(), mask)
    return per_token, metrics


def kl_penalty_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL of the policy from the reference as a loss term ``[N, T]``, 0 outside ``mask``.

    GRPO adds ``beta`` times this to the policy loss instead of folding the KL into the reward; the
    gradient flows through ``logps``. The log-ratio is zeroed outside ``mask`` first so that padding
    can neither overflow ``exp`` (k3) nor send a NaN gradient back.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logps - ref_logps, torch.zeros_like(logps))
    return kl_estimator(estimator)(log_ratio) * mask.to(logps.dtype)


def truncated_importance_weights(trainer_logps: Tensor, generator_logps: Tensor, mask: Tensor, *,
                                 level: Literal["token", "sequence"], cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance-sampling weights ``min(pi_trainer / pi_generator, cap)`` ``[N, T]``, without gradient.

    A fast engine's numerics (kernels, precision, batching) make its log-probs differ from the
    trainer's for the very tokens it sampled: the rollout is then slightly off-policy for the policy
    the loss differentiates. Weighting each token's policy-gradient loss by the truncated ratio of the
    two (the "TIS" correction of Yao et al., 2025) removes that bias up to the cap, which bounds the
    variance a rare, badly mismatched token could add. ``level="sequence"`` uses one weight per row,
    the product of its tokens' ratios (``exp`` of the summed log-ratios), truncated.
    """
    with torch.no_grad():
        weights = mask.to(trainer_logps.dtype)
        log_ratio = (trainer_logps - generator_logps) * weights
        if level == "sequence":
            log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(trainer_logps)
        ratio = torch.exp(log_ratio.clamp(max=math.log(cap)))
        metrics = {"is_weight": masked_mean(ratio, mask),
                   "is_truncated_fraction": masked_mean((log_ratio >= math.log(cap)).float(), mask)}
    return ratio, metrics


def logp_gap(trainer_logps: Tensor, generator_logps: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the trainer's log-probs of the sampled tokens are from the generator's: the mean absolute
    difference over ``mask``. Near 0 for the ``hf`` engine (the same module computes both); a growing
    value from a fast engine is the mismatch that precedes silent collapses."""
    with torch.no_grad():
        return {"logp_diff": masked_mean((trainer_logps - generator_logps).abs(), mask)}
