"""``ppo``: the clipped PPO objective (Schulman et al., 2017), and every PPO setting of a stage.

A stage selects PPO by its loss (``losses: [{name: ppo, judge: {...}, ...}]``) on prompt-only data;
``aligner.loop`` then hands the stage to ``aligner.ppo.stage``, which samples rollouts, scores them
with ``judge``, and calls ``compute`` on minibatches of each rollout batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from aligner.hookspecs import hookimpl
from aligner.ppo.gae import masked_mean, masked_var
from aligner.protocols import PROMPT_ONLY, LossInputs, LossOutput, Options


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``mean(max(-A * r, -A * clip(r, 1 - e, 1 + e)))``, ``r = pi / pi_old``."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimate of KL(pi_old || pi): how far this update moved from the rollout policy.
            "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),
        }
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2))``."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)``: 1 for a perfect critic, 0 for one that predicts the mean."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class PPOLoss:
    """Clipped policy loss plus ``value_coef`` times the clipped value loss.

    ``compute`` reads from ``inputs.extra``: ``values`` (new critic values, ``[N, T]``),
    ``old_logps``, ``old_values``, ``advantages``, ``returns`` (from the rollout), and the new
    per-token log-probs from ``inputs.policy.token_logps`` with its ``mask``.
    """

    name = "ppo"
    data_formats = (PROMPT_ONLY,)
    needs_reference = True
    needs_token_logps = True

    class Options(Options):
        """PPO settings: rollout sampling, reward shaping, KL control, GAE and the update."""

        judge: dict[str, Any] = Field(description="the judge plugin that scores rollouts: {name: ..., options}")
        # rollouts
        max_new_tokens: int = Field(32, gt=0)
        temperature: float = Field(1.0, gt=0)
        top_p: float = Field(1.0, gt=0, le=1)
        generation_batch_size: int = Field(64, gt=0, description="prompts per generate() call")
        # rewards
        kl_estimator: Literal["k1", "k2", "k3"] = "k1"
        kl_coef: float = Field(0.05, ge=0, description="initial KL coefficient")
        kl_controller: Literal["fixed", "adaptive"] = "adaptive"
        kl_target: float = Field(6.0, gt=0, description="adaptive: target KL per completion (nats)")
        kl_horizon: int = Field(10000, gt=0, description="adaptive: samples over which the error is corrected")
        length_penalty: float = Field(0.0, description="subtracted from the score per completion token")
        missing_eos_penalty: float | None = Field(None, description="subtracted when no EOS was generated")
        reward_clip: float | None = Field(None, gt=0, description="clip scores to [-c, c]")
        whiten_rewards: bool = False
        # advantages and update
        gamma: float = Field(1.0, ge=0, le=1)
        lam: float = Field(0.95, ge=0, le=1)
        ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
        mini_batch_size: int = Field(16, gt=0)
        clip_range: float = Field(0.2, gt=0)
        value_clip_range: float = Field(0.2, gt=0)
        value_coef: float = Field(0.1, ge=0)
        max_approx_kl: float | None = Field(
            None, gt=0, description="end a rollout's update passes early once a minibatch's approx KL exceeds this")
        whiten_advantages: bool = True
        # reporting
        sample_every: int = Field(10, gt=0, description="write/print a table of rollout samples every N steps")
        num_samples: int = Field(4, gt=0, description="rows in that table")

        @field_validator("judge")
        @classmethod
        def _judge_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
            # The judge is checked here, with the stage's other options, so a bad judge fails before
            # any model is loaded.
            build_judge(value)
            return value

        @model_validator(mode="after")
        def _target_needs_adaptive(self):
            if self.kl_controller == "fixed" and "kl_target" in self.model_fields_set:
                raise ValueError("'kl_target' is only used by kl_controller 'adaptive'")
            return self

    def __init__(self, options: Options):
        self.options = options
        self.judge = build_judge(options.judge)

    def compute(self, inputs: LossInputs) -> LossOutput:
        """The PPO loss of one minibatch, with its metrics."""
        o, extra = self.options, inputs.extra
        logps, mask = inputs.policy.token_logps, inputs.policy.mask
        assert logps is not None and mask is not None, "ppo needs per-token log-probs"
        pg_loss, pg_metrics = policy_loss(logps, extra["old_logps"], extra["advantages"], mask, o.clip_range)
        vf_loss, vf_metrics = value_loss(extra["values"], extra["old_values"], extra["returns"], mask,
                                         o.value_clip_range)
        metrics = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **pg_metrics, **vf_metrics}
        return LossOutput(pg_loss + o.value_coef * vf_loss, metrics)


def build_judge(choice: dict[str, Any]) -> Any:
    """Instantiate a judge from ``{name: ..., **options}``; a ``ValueError`` names the bad key."""
    from pydantic import ValidationError

    from aligner.errors import AlignerError
    from aligner.plugins import get_registry

    if not isinstance(choice, dict) or not isinstance(choice.get("name"), str):
        raise ValueError("a judge is a mapping with a 'name' key, e.g. {name: rule, regex: '...'}")
    options = {k: v for k, v in choice.items() if k != "name"}
    try:
        cls = get_registry("judge").get(choice["name"])
    except AlignerError as exc:
        raise ValueError(str(exc)) from None
    try:
        return cls(cls.Options.model_validate(options))
    except ValidationError as exc:
        problems = [f"judge.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(problems)) from None
    except AlignerError as exc:
        raise ValueError(f"judge '{choice['name']}': {exc}") from None


@hookimpl
def register_losses(register):
    """Register ``ppo``."""
    register(PPOLoss)
