"""``grpo``: group relative policy optimisation (Shao et al., 2024, DeepSeekMath), and through its
options Dr. GRPO (Liu et al., 2025) and DAPO (Yu et al., 2025).

For each prompt, ``group_size`` completions are sampled and scored; each completion's advantage is
its score minus the group's mean, divided by the group's std (``estimator.scale``: group, batch or
none). No critic. The loss per token is the clipped surrogate plus ``kl_coef`` times the k3 estimate
of the KL to the reference (``kl_coef: 0``, the default as in TRL, builds no reference at all).

- Dr. GRPO: ``estimator: {name: group_relative, scale: none}``, ``aggregation: seq-mean-token-sum-norm``;
- DAPO: ``clip_high: 0.28``, ``aggregation: token-mean``, ``drop_uniform_groups: true``,
  ``overlong_buffer: N``, ``mask_truncated: true`` (optional);
- GSPO: ``ratio_level: sequence``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from aligner.algorithms.policy_gradient import PolicyGradientAlgorithm, PolicyGradientOptions
from aligner.hookspecs import hookimpl


class GRPOOptions(PolicyGradientOptions):
    """GRPO: group-relative advantages, KL (if any) as a loss term."""

    estimator: dict[str, Any] = Field(default_factory=lambda: {"name": "group_relative", "scale": "group"})
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (G)")


class GRPO(PolicyGradientAlgorithm):
    """Group-relative advantages with the clipped policy loss."""

    name = "grpo"
    Options = GRPOOptions


@hookimpl
def register_algorithms(register):
    """Register ``grpo``."""
    register(GRPO)
