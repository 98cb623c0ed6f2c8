"""``online_dpo``: DPO on the policy's own samples (Guo et al., 2024, "Direct Language Model Alignment
from Online AI Feedback").

Each step samples two completions per prompt from the current policy; the judge scores both and the
better one becomes ``chosen`` (pairs whose scores differ by no more than ``min_margin`` are ties and
are left out); the stage's preference loss(es), e.g. ``losses: [{name: dpo, beta: 0.1}]``, then train
on these pairs exactly as offline DPO trains on a dataset, with reference log-probs computed on the
fly. ``kl`` reports the policy's KL to the reference on its samples (sum over tokens of log pi - log ref).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from pydantic import Field

from aligner.algorithms.base import AlgorithmContext, AlgorithmSetup, StepResult, StepServices
from aligner.algorithms.online import OnlineAlgorithm, RolloutOptions
from aligner.data.batching import collate
from aligner.errors import AlignerError, ConfigError
from aligner.hookspecs import hookimpl
from aligner.modeling.logprobs import completion_logprobs
from aligner.online.policy_loss import logp_gap
from aligner.online.rollout import Rollout, generate_rollout, shard, write_samples
from aligner.protocols import PREFERENCE
from aligner.training.micro_batch import compute_losses, move_to


class OnlineDPOOptions(RolloutOptions):
    """Sampling (``RolloutOptions``) and pairing; the loss and its ``beta`` are the stage's ``losses``."""

    min_margin: float = Field(0.0, ge=0, description="pairs whose scores differ by no more than this are ties")
    max_refill_batches: int = Field(4, ge=0, description="extra prompt batches drawn when a batch has no pair")


class OnlineDPO(OnlineAlgorithm):
    """Two samples per prompt, the judge's preference, the stage's DPO-family loss, on policy."""

    name = "online_dpo"
    Options = OnlineDPOOptions

    def check_stage(self, stage: Any) -> None:
        """At least one loss, every one trainable on preference pairs; no precomputed reference."""
        where = f"'stages[{stage.index}]"
        if not stage.losses:
            raise ConfigError(f"stage '{stage.name}': online_dpo trains with the stage's preference loss; add "
                              f"{where}.losses' (e.g. [{{name: dpo, beta: 0.1}}])")
        for j, (loss, _) in enumerate(stage.losses):
            if PREFERENCE not in loss.data_formats:
                raise ConfigError(f"stage '{stage.name}': loss '{loss.name}' ({where}.losses[{j}]') does not train on "
                                  "preference pairs, which online_dpo makes from its samples")
        if stage.reference_name == "cached":
            raise ConfigError(f"stage '{stage.name}': the 'cached' reference precomputes a dataset's completions; "
                              f"online samples are new every step (use {where}.reference: auto')")
        if stage.config.train.gradient_accumulation_steps != 1:
            raise ConfigError(f"stage '{stage.name}': {where}.train.gradient_accumulation_steps' must be 1 for online_dpo")
        self.engine.check_stage(stage)

    def needs_reference(self, losses: list[tuple[Any, float]]) -> bool:
        """Whether the preference losses read reference log-probs (DPO does, SimPO does not)."""
        return any(loss.needs_reference for loss, _ in losses)

    def setup(self, context: AlgorithmContext) -> AlgorithmSetup:
        """The policy trains; the prompt stream starts at the resumed position."""
        return AlgorithmSetup(module=context.policy, steps_per_epoch=self.start_prompts(context))

    def train_step(self, step: StepServices) -> StepResult:
        """Sample pairs, judge them, one update of the preference loss on them."""
        o, run = self.options, step.run
        rollout, pairs, epoch, consumed, draws = self._pairs(step)
        stage = dataclasses.replace(run.stage, data_format=PREFERENCE)
        pad = run.tokenizer.pad_token_id
        examples = [{"row_id": rollout.row_ids[c], "prompt_ids": rollout.prompt_ids[c],
                     "chosen_ids": rollout.completion_ids[c] or [pad], "rejected_ids": rollout.completion_ids[r] or [pad]}
                    for c, r in pairs]
        local = len(examples)
        # A process without a pair still runs a zero-weight forward: DDP's gradient sync is a collective.
        batch = move_to(collate(examples or _placeholder(rollout, pad), PREFERENCE, pad,
                                share_prompt=stage.config.train.share_prompt), step.device)
        global_pairs = float(step.all_reduce_sum(torch.tensor([float(local)], device=step.device))[0])
        # Losses are means over a process's pairs; weighting by its share makes the DDP average the
        # mean over every pair of every process.
        share = local * step.num_processes / max(global_pairs, 1.0)
        # Measured on the policy that sampled the rollout, before this step's update moves it.
        rollout_metrics = self._rollout_metrics(step, rollout, pairs)
        with step.micro_batch():
            loss, metrics = compute_losses(step.model, stage, batch)
            step.backward(loss * share, observed=loss, batch=batch)
        update = step.update()
        metrics = dict(metrics) if local else {k: torch.zeros(()) for k in metrics}
        metrics.update(rollout_metrics)
        metrics["pairs"] = local / max(len(rollout.row_ids) // 2, 1)
        metrics["prompt_batches"] = float(draws)
        if update.grad_norm is not None:
            metrics["grad_norm"] = update.grad_norm
        number = run.step + 1
        if number == 1 or number % o.sample_every == 0:
            write_samples(run, number, {"prompt": [rollout.prompts[c] for c, _ in pairs],
                                        "chosen": [rollout.texts[c] for c, _ in pairs],
                                        "rejected": [rollout.texts[r] for _, r in pairs],
                                        "margin": [float(rollout.scores[c] - rollout.scores[r]) for c, r in pairs]},
                          o.num_samples)
        return StepResult(step.mean_metrics([metrics]), epoch, consumed, applied=update.applied,
                          progress=("reward/mean", "loss"))

    @torch.no_grad()
    def _pairs(self, step: StepServices) -> tuple[Rollout, list[tuple[int, int]], int, int, int]:
        """Two samples for each prompt of this process's share; the (chosen, rejected) rows of the
        non-tied ones, drawing more prompt batches (all processes alike) while no process has a pair."""
        o, run = self.options, step.run
        for draw in range(1 + o.max_refill_batches):
            epoch, consumed, indices = next(self._prompts)
            rollout = generate_rollout(run, step.policy(), self.rewards, self.engine,
                                       shard(indices, step.process_index, step.num_processes), group_size=2,
                                       max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p,
                                       batch_size=o.generation_batch_size)
            scores = rollout.scores.tolist()  # finite: the reward sources refuse anything else
            pairs = [(a, b) if scores[a] > scores[b] else (b, a) for a, b in
                     ((i, i + 1) for i in range(0, len(scores), 2)) if abs(scores[a] - scores[b]) > o.min_margin]
            found = step.all_reduce_sum(torch.tensor([float(len(pairs))], device=step.device))
            if float(found[0]) > 0:
                return rollout, pairs, epoch, consumed, draw + 1
        where = f"'stages[{run.stage.index}].algorithm"
        raise AlignerError(f"stage '{run.stage.name}': the judge scored both samples of every prompt alike in "
                           f"{o.max_refill_batches + 1} prompt batches; no preference pair to learn from (check "
                           f"the reward sources, raise {where}.temperature' or {where}.max_refill_batches', or lower "
                           f"{where}.min_margin')")

    @torch.no_grad()
    def _rollout_metrics(self, step: StepServices, rollout: Rollout, pairs: list[tuple[int, int]]) -> dict[str, Any]:
        """Judge scores of the samples, the chosen-rejected margin, and the KL to the reference."""
        scores = rollout.scores
        metrics: dict[str, Any] = {
            "reward/mean": scores.mean(),
            "reward/margin": (sum(float(scores[c] - scores[r]) for c, r in pairs) / len(pairs)) if pairs else 0.0,
            "response_length": rollout.lengths.float().mean(),
            **self.rewards.metrics(rollout.sources),
        }
        batch = rollout.batch(step.run.tokenizer.pad_token_id)
        with step.accelerator.autocast():
            policy = completion_logprobs(step.model, batch, token_level=True)
        # The trainer's log-probs of the sampled tokens against the engine's own (as the GRPO family logs).
        gap = logp_gap(policy.token_logps, rollout.token_generator_logps(policy.mask), policy.mask)
        metrics.update({f"rollout/{k}": v for k, v in gap.items()})
        if self.needs_reference(step.run.stage.losses):
            metrics["kl"] = (policy.logps - step.run.stage.reference.logprobs(batch).logps).mean()
        return metrics


def _placeholder(rollout: Rollout, pad: int) -> list[dict[str, Any]]:
    """One pair from the first two samples, run at zero weight by a process that has no real pair."""
    return [{"row_id": rollout.row_ids[0], "prompt_ids": rollout.prompt_ids[0],
             "chosen_ids": rollout.completion_ids[0] or [pad], "rejected_ids": rollout.completion_ids[1] or [pad]}]


@hookimpl
def register_algorithms(register):
    """Register ``online_dpo``."""
    register(OnlineDPO)
