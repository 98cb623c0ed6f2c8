"""Rewards of online algorithms: the judge that scores rollouts, and the score adjustments PPO-style
methods apply before advantages (length and missing-EOS penalties, clipping, whitening)."""

from __future__ import annotations

from typing import Any

import torch


def build_judge(choice: dict[str, Any]) -> Any:
    """Instantiate a judge from ``{name: ..., **options}``; a ``ValueError`` names the bad key."""
    from aligner.plugins import build_from_mapping

    return build_from_mapping("judge", choice, "judge", "{name: rule, regex: '...'}")


def adjust_scores(scores: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor, *, length_penalty: float,
                  missing_eos_penalty: float | None, clip: float | None, whiten: bool) -> torch.Tensor:
    """Judge scores after the optional penalties, clipping and whitening (in that order).

    ``length_penalty`` is subtracted per completion token; ``missing_eos_penalty`` from completions
    that hit ``max_new_tokens`` without an end-of-sequence token.
    """
    scores = scores - length_penalty * lengths.to(scores.dtype)
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if whiten and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    return scores
