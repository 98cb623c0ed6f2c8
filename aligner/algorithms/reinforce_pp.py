"""``reinforce_pp``: REINFORCE++ (Hu, 2025).

The KL to the reference is a per-token reward (``-kl_coef * KL``) beside the score on the last
token; each token's return is the sum of the rewards from it on (gamma 1), and returns are whitened
over the whole global batch: a critic-free baseline that works with one sample per prompt.
``estimator: {name: reinforce_pp_baseline}`` with ``group_size > 1`` subtracts the group's mean score
first (REINFORCE++-baseline).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from aligner.algorithms.policy_gradient import PolicyGradientAlgorithm, PolicyGradientOptions
from aligner.hookspecs import hookimpl


class ReinforcePPOptions(PolicyGradientOptions):
    """REINFORCE++: token-level KL-shaped returns whitened over the batch."""

    estimator: dict[str, Any] = Field(default_factory=lambda: {"name": "reinforce_pp"})
    group_size: int = Field(1, ge=1, description="completions sampled per prompt")
    kl_coef: float = Field(0.01, ge=0, description="beta; 0 builds and runs no reference")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["loss", "reward"] = "reward"


class ReinforcePP(PolicyGradientAlgorithm):
    """REINFORCE++ with the clipped policy loss."""

    name = "reinforce_pp"
    Options = ReinforcePPOptions


@hookimpl
def register_algorithms(register):
    """Register ``reinforce_pp``."""
    register(ReinforcePP)
