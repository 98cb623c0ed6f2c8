"""``ppo``: proximal policy optimisation with a critic (Schulman et al., 2017), for RLHF and RLAIF.

One training step = one rollout batch (``train.batch_size`` prompts, shared out over processes):

1. rollout: sample a completion per prompt from the current policy;
2. score: the judge scores each (prompt, completion); the reference gives per-token log-probs;
3. shape: reward = adjusted score at the last token - kl_coef * KL per token; GAE (with the value
   head as critic) gives advantages and returns;
4. update: ``ppo_epochs`` passes over shuffled minibatches, each one update of the clipped policy
   loss plus ``value_coef`` times the clipped value loss; then the KL controller sees the batch's KL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from aligner.algorithms.base import (
    AlgorithmContext,
    AlgorithmSetup,
    StepResult,
    StepServices,
)
from aligner.algorithms.online import OnlineAlgorithm, RolloutOptions
from aligner.hookspecs import hookimpl
from aligner.online.advantages import AdvantageInputs, masked_mean, token_level_rewards
from aligner.online.advantages.gae import GAE
from aligner.online.critic import PolicyWithValueHead, explained_variance, hidden_size_of, value_loss
from aligner.online.kl import AdaptiveKLController, FixedKLController, kl_per_token
from aligner.online.policy_loss import logp_gap, policy_gradient_loss
from aligner.online.rewards import adjust_scores
from aligner.online.rollout import generate_rollout, rows_of, shard, write_samples
from aligner.reporting.metrics import to_float
from aligner.training.resume import load_weights


class PPOOptions(RolloutOptions):
    """PPO settings: rollout sampling (``RolloutOptions``), reward shaping, KL control, GAE and the update."""

    # rewards
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_coef: float = Field(0.05, ge=0, description="initial KL coefficient; 0 builds and runs no reference")
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
    mini_batch_size: int = Field(16, gt=0, description="rollout rows per update (per process)")
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0)
    max_approx_kl: float | None = Field(
        None, gt=0, description="end a rollout's update passes early once a minibatch's approx KL exceeds this")
    whiten_advantages: bool = True

    @model_validator(mode="after")
    def _target_needs_adaptive(self):
        if self.kl_controller == "fixed" and "kl_target" in self.model_fields_set:
            raise ValueError("'kl_target' is only used by kl_controller 'adaptive'")
        return self


class PPO(OnlineAlgorithm):
    """Actor-critic PPO: the policy with a value head, GAE advantages, clipped policy and value losses."""

    name = "ppo"
    Options = PPOOptions

    def __init__(self, options: PPOOptions):
        super().__init__(options)
        o = options
        self.controller = (AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon) if o.kl_controller == "adaptive"
                           else FixedKLController(o.kl_coef))
        self.estimator = GAE(GAE.Options(gamma=o.gamma, lam=o.lam, whiten=o.whiten_advantages))

    # -- configuration --------------------------------------------------------------------------

    def check_stage(self, stage: Any) -> None:
        """No losses of its own, one update per minibatch, a reference that gives per-token log-probs."""
        self.check_own_loss_stage(stage)

    def needs_reference(self, losses: list[tuple[Any, float]]) -> bool:
        """A KL penalty needs the reference; ``kl_coef: 0`` (which no controller moves) needs none."""
        return self.options.kl_coef > 0

    # -- setup and state ------------------------------------------------------------------------

    def setup(self, context: AlgorithmContext) -> AlgorithmSetup:
        """The policy with a value head, and the stream of prompt batches."""
        run, o = context.run, self.options
        steps_per_epoch = self.start_prompts(context)
        actor_critic = PolicyWithValueHead(context.policy, hidden_size_of(context.policy)).to(run.accelerator.device)
        rows = run.stage.config.train.batch_size // run.accelerator.num_processes
        updates = o.ppo_epochs * -(-rows // o.mini_batch_size)
        return AlgorithmSetup(module=actor_critic, steps_per_epoch=steps_per_epoch, updates_per_step=updates)

    def state_dict(self) -> dict[str, Any]:
        """The KL coefficient (the adaptive controller moves it)."""
        return {"kl_coef": self.controller.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the KL coefficient."""
        self.controller.value = state["kl_coef"]

    def load_weights(self, module: torch.nn.Module, directory: Path) -> None:
        """The policy (or its adapter) and the value head."""
        from safetensors.torch import load_file

        load_weights(module.policy, directory)
        module.value_head.load_state_dict(load_file(str(directory / "value_head.safetensors")))

    def policy_of(self, module: torch.nn.Module) -> torch.nn.Module:
        """The policy without its value head."""
        return module.policy

    # -- training -------------------------------------------------------------------------------

    def train_step(self, step: StepServices) -> StepResult:
        """Rollout, then ``ppo_epochs`` passes of minibatch updates; the KL controller sees the batch's KL."""
        epoch, consumed, indices = next(self._prompts)
        rollout = self._collect(step, shard(indices, step.process_index, step.num_processes))
        updates, applied = self._update(step, rollout)
        metrics = {**step.mean_metrics(updates), "updates": float(len(updates))}
        metrics.update(step.mean_metrics([rollout["metrics"]]))
        self.controller.update(metrics["kl"], len(indices))
        number = step.run.step + 1
        if number == 1 or number % self.options.sample_every == 0:
            write_samples(step.run, number, rollout["samples"], self.options.num_samples)
        return StepResult(metrics, epoch, consumed, applied=applied, progress=("reward/mean", "kl", "kl_coef"))

    @torch.no_grad()
    def _collect(self, step: StepServices, indices: list[int]) -> dict[str, Any]:
        """Sample, score and shape one rollout batch; return its tensors, samples and metrics."""
        o, run = self.options, step.run
        sampled = generate_rollout(run, step.policy(), self.rewards, self.engine, indices, group_size=1,
                                   max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p,
                                   batch_size=o.generation_batch_size)
        batch = sampled.batch(run.tokenizer.pad_token_id)
        with step.accelerator.autocast():
            out = step.model(batch)
        mask = out["mask"]
        if self.needs_reference([]):
            reference = run.stage.reference.logprobs(batch, token_level=True)
            kl = kl_per_token(out["logps"], reference.token_logps, mask, o.kl_estimator)
        else:
            kl = torch.zeros_like(out["logps"])
        scores = sampled.scores
        adjusted = adjust_scores(scores, mask.sum(-1), sampled.ended, length_penalty=o.length_penalty,
                                 missing_eos_penalty=o.missing_eos_penalty, clip=o.reward_clip,
                                 whiten=o.whiten_rewards)
        inputs = AdvantageInputs(scores=adjusted, mask=mask, group_ids=sampled.group_ids,
                                 token_rewards=-self.controller.value * kl * mask, values=out["values"],
                                 all_reduce_sum=step.all_reduce_sum)
        estimated = self.estimator.estimate(inputs)
        sequence_kl = kl.sum(-1)
        metrics = {
            "reward/mean": scores.mean(), "reward/std": scores.std() if len(scores) > 1 else torch.tensor(0.0),
            "reward/shaped": token_level_rewards(inputs).sum(-1).mean(), "kl": sequence_kl.mean(),
            "kl_coef": self.controller.value, "entropy": masked_mean(out["entropy"], mask),
            "response_length": mask.sum(-1).float().mean(), "eos_fraction": sampled.ended.float().mean(),
            "explained_variance": explained_variance(out["values"], estimated.returns, mask),
            **self.rewards.metrics(sampled.sources),
            **{f"rollout/{k}": v for k, v in logp_gap(out["logps"], sampled.token_generator_logps(mask), mask).items()},
        }
        samples = {"prompt": sampled.prompts, "completion": sampled.texts, "score": scores.tolist(),
                   "kl": sequence_kl.tolist()}
        return {"batch": batch, "old_logps": out["logps"], "old_values": out["values"],
                "advantages": estimated.advantages, "returns": estimated.returns, "samples": samples,
                "metrics": metrics}

    def _update(self, step: StepServices, rollout: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """``ppo_epochs`` passes of minibatch updates over one rollout batch; each update's metrics."""
        o = self.options
        batch = rollout["batch"]
        rows = batch["input_ids"].shape[0]
        collected: list[dict[str, Any]] = []
        applied = False
        for _ in range(o.ppo_epochs):
            for chosen in torch.randperm(rows, device=batch["input_ids"].device).split(o.mini_batch_size):
                sub = rows_of(batch, chosen)
                with step.micro_batch():
                    out = step.model(sub)
                mask = out["mask"]
                per_token, pg_metrics = policy_gradient_loss(out["logps"], rollout["old_logps"][chosen],
                                                             rollout["advantages"][chosen], mask,
                                                             clip_low=o.clip_range, clip_high=o.clip_range)
                pg_loss = masked_mean(per_token, mask)
                vf_loss, vf_metrics = value_loss(out["values"], rollout["old_values"][chosen],
                                                 rollout["returns"][chosen], mask, o.value_clip_range)
                loss = pg_loss + o.value_coef * vf_loss
                step.backward(loss, batch=sub)
                update = step.update()
                applied = applied or update.applied
                metrics = {"loss": loss.detach(), "policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                           **pg_metrics, **vf_metrics}
                if update.grad_norm is not None:
                    metrics["grad_norm"] = update.grad_norm
                collected.append(metrics)
                # Early stop (as SB3's target_kl): the policy has already moved far from the one that
                # sampled. Every process takes the same decision, or their update counts would differ.
                if o.max_approx_kl is not None and _mean_over_processes(step, metrics["approx_kl"]) > o.max_approx_kl:
                    return collected, applied
        return collected, applied


def _mean_over_processes(step: StepServices, value: torch.Tensor) -> float:
    total = step.all_reduce_sum(value.detach().reshape(1).to(torch.float64))
    return to_float(total[0]) / step.num_processes


@hookimpl
def register_algorithms(register):
    """Register ``ppo``."""
    register(PPO)
