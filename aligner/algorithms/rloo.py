"""``rloo``: REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024, "Back to Basics").

Each completion's baseline is the mean score of the other ``group_size - 1`` completions for the same
prompt: an unbiased baseline without a critic. The KL to the reference enters the reward (k1 per
token, summed into the sequence's reward) as in the paper and TRL.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from aligner.algorithms.policy_gradient import PolicyGradientAlgorithm, PolicyGradientOptions
from aligner.hookspecs import hookimpl


class RLOOOptions(PolicyGradientOptions):
    """RLOO: leave-one-out baselines, KL in the reward."""

    estimator: dict[str, Any] = Field(default_factory=lambda: {"name": "rloo"})
    group_size: int = Field(4, ge=2, description="completions sampled per prompt (k)")
    kl_coef: float = Field(0.05, ge=0, description="beta; 0 builds and runs no reference")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["loss", "reward"] = "reward"


class RLOO(PolicyGradientAlgorithm):
    """Leave-one-out advantages with the clipped policy loss."""

    name = "rloo"
    Options = RLOOOptions


@hookimpl
def register_algorithms(register):
    """Register ``rloo``."""
    register(RLOO)
