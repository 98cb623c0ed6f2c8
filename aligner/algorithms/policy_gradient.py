"""The critic-free online family's shared step: GRPO, RLOO, REINFORCE++ (and Dr. GRPO, DAPO, GSPO as options).

One training step:

1. rollout: ``train.batch_size`` prompts (shared out over processes), ``group_size`` samples each,
   scored by the judge; with ``drop_uniform_groups`` (DAPO's dynamic sampling) groups whose scores
   are all equal carry no signal, are dropped, and more prompt batches are drawn to refill;
2. score adjustments: the soft overlong penalty; with ``kl_in: reward`` the per-token KL to the
   reference becomes a per-token reward ``-kl_coef * KL``;
3. advantages: the advantage-estimator plugin (``group_relative``, ``rloo``, ``reinforce_pp``, ...);
4. update: ``epochs`` passes over the rollout, each split into ``mini_batches`` optimizer updates,
   each accumulated over micro-batches of ``micro_batch_size`` rows. The per-token loss is the
   clipped surrogate (``aligner.online.policy_loss``), plus ``kl_coef`` times the KL estimate when
   ``kl_in: loss``, weighted by the aggregation mode with counts of the whole update on every
   process: the loss and its gradients do not depend on micro-batching or the number of processes.

An algorithm of this family is a subclass that sets ``name`` and the defaults of its ``Options``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from aligner.algorithms.base import (
    AlgorithmContext,
    AlgorithmSetup,
    StepResult,
    StepServices,
)
from aligner.algorithms.online import OnlineAlgorithm, RolloutOptions
from aligner.errors import AlignerError, ConfigError
from aligner.modeling.logprobs import completion_logprobs
from aligner.online.advantages import AdvantageInputs, masked_mean
from aligner.online.aggregation import Aggregation, step_counts, token_weights
from aligner.online.kl import kl_per_token
from aligner.online.policy_loss import (
    kl_penalty_loss,
    logp_gap,
    policy_gradient_loss,
    truncated_importance_weights,
)
from aligner.online.rollout import Rollout, generate_rollout, rows_of, shard, write_samples
from aligner.online.verifiers import length_penalty
from aligner.reporting.metrics import to_float


class PolicyGradientOptions(RolloutOptions):
    """Settings shared by GRPO, RLOO and REINFORCE++ (and the rollout settings); each algorithm changes some defaults."""

    estimator: dict[str, Any] = Field(default_factory=lambda: {"name": "group_relative"}, description=(
        "the advantage-estimator plugin: {name: ..., options}"))
    group_size: int = Field(4, ge=1, description="completions sampled per prompt (G)")
    # KL to the reference
    kl_coef: float = Field(0.0, ge=0, description="beta; 0 builds and runs no reference")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = Field("loss", description=(
        "loss: + kl_coef * KL per token in the loss (GRPO); reward: - kl_coef * KL per token in the reward"))
    # policy loss
    clip_low: float = Field(0.2, gt=0, lt=1, description="ratios below 1 - clip_low are clipped")
    clip_high: float = Field(0.2, gt=0, description="ratios above 1 + clip_high are clipped (DAPO: 0.28)")
    dual_clip: float | None = Field(None, gt=1, description="cap the loss of negative-advantage tokens at -A * c")
    ratio_level: Literal["token", "sequence"] = Field("token", description="sequence: GSPO's sequence-level ratio")
    aggregation: Aggregation = "token-mean"
    norm_length: int | None = Field(None, gt=0, description=(
        "seq-mean-token-sum-norm's constant (default: max_new_tokens)"))
    # update
    epochs: int = Field(1, gt=0, description="passes over each rollout")
    mini_batches: int = Field(1, gt=0, description="optimizer updates per pass (the rollout's rows split evenly)")
    micro_batch_size: int | None = Field(None, gt=0, description="rows per forward/backward; default: a whole update")
    # DAPO
    drop_uniform_groups: bool = Field(False, description="drop groups whose scores are all equal, refill from more prompts")
    max_refill_batches: int = Field(4, ge=0, description="extra prompt batches drawn per step to refill dropped groups")
    overlong_buffer: int | None = Field(None, gt=0, description=(
        "soft overlong penalty over the last N tokens before max_new_tokens (DAPO's L_cache)"))
    overlong_penalty: float = Field(1.0, ge=0, description="the penalty at max_new_tokens")
    mask_truncated: bool = Field(False, description="completions that hit max_new_tokens without EOS get no loss")
    # engine/trainer mismatch
    importance_correction: Literal["none", "token", "sequence"] = Field("none", description=(
        "weight each token's loss by min(pi_trainer / pi_generator, importance_cap), per token or per sequence: "
        "corrects rollouts from an engine whose log-probs differ from the trainer's (truncated IS)"))
    importance_cap: float = Field(2.0, gt=1, description="the truncation of importance_correction's ratio")

    @field_validator("estimator")
    @classmethod
    def _estimator_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        build_estimator(value)
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.ratio_level == "sequence" and "aggregation" not in self.model_fields_set:
            # GSPO's objective is a mean over sequences of one clipped ratio each: every sequence
            # weighs the same, whatever its length.
            self.aggregation = "seq-mean-token-mean"
        if self.overlong_buffer is not None and self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"'overlong_buffer' ({self.overlong_buffer}) must be below max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


def build_estimator(choice: dict[str, Any]) -> Any:
    """Instantiate an advantage estimator from ``{name: ..., **options}``; a ``ValueError`` names the bad key."""
    from aligner.plugins import build_from_mapping

    return build_from_mapping("advantage estimator", choice, "estimator", "{name: group_relative}")


def _check_estimator_groups(estimator: Any, group_size: int, stage: str, where: str) -> None:
    """Try the estimator on two groups of ``group_size`` samples with distinct scores: refuse a group size
    it rejects (RLOO needs 2) or with which the scores give no advantage at all (a group baseline with
    one sample per prompt leaves nothing to compare)."""
    from aligner.online.advantages import AdvantageInputs

    rows = 2 * group_size
    probe = AdvantageInputs(scores=torch.arange(rows, dtype=torch.float32), mask=torch.ones(rows, 2, dtype=torch.bool),
                            group_ids=torch.arange(rows) // group_size)
    try:
        advantages = estimator.estimate(probe).advantages
    except ValueError as exc:
        raise ConfigError(f"stage '{stage}': estimator '{estimator.name}' cannot work with {where}.group_size' "
                          f"{group_size}: {exc}") from None
    if not bool(advantages.abs().sum() > 0):
        raise ConfigError(f"stage '{stage}': with {where}.group_size' {group_size}, estimator '{estimator.name}' "
                          "gives every sample a zero advantage whatever its score: raise group_size")


class PolicyGradientAlgorithm(OnlineAlgorithm):
    """Rollout groups, an advantage estimator, and the clipped policy loss with an aggregation mode."""

    Options = PolicyGradientOptions

    def __init__(self, options: PolicyGradientOptions):
        super().__init__(options)
        self.estimator = build_estimator(options.estimator)

    def check_stage(self, stage: Any) -> None:
        """Its own loss (no stage losses), no critic, an estimator that works with ``group_size``, and
        updates that each get rows."""
        self.check_own_loss_stage(stage)
        where = f"'stages[{stage.index}].algorithm"
        if self.estimator.needs_critic:
            raise ConfigError(f"stage '{stage.name}': estimator '{self.estimator.name}' ({where}.estimator') needs "
                              f"a critic, which {self.name} does not train (use algorithm 'ppo')")
        _check_estimator_groups(self.estimator, self.options.group_size, stage.name, where)
        rows = stage.config.train.batch_size * self.options.group_size
        if self.options.mini_batches > rows:
            raise ConfigError(f"stage '{stage.name}': {where}.mini_batches' ({self.options.mini_batches}) is more "
                              f"than the {rows} rows of a rollout (train.batch_size x group_size)")

    def needs_reference(self, losses: list[tuple[Any, float]]) -> bool:
        """Only a KL term needs the reference: ``kl_coef: 0`` builds and runs none."""
        return self.options.kl_coef > 0

    def setup(self, context: AlgorithmContext) -> AlgorithmSetup:
        """The policy trains; the prompt stream starts at the resumed position."""
        return AlgorithmSetup(module=context.policy, steps_per_epoch=self.start_prompts(context),
                              updates_per_step=self.options.epochs * self.options.mini_batches)

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, step: StepServices) -> StepResult:
        """Rollout, advantages, then ``epochs x mini_batches`` updates."""
        o, run = self.options, step.run
        rollout, epoch, consumed, rollout_metrics = self._rollout(step)
        batch = rollout.batch(run.tokenizer.pad_token_id)
        tensors = self._score(step, rollout, batch, rollout_metrics)
        collected, applied = [], False
        for _ in range(o.epochs):
            rows = batch["input_ids"].shape[0]
            # Shuffled (from the run's RNG, so resume is exact) only when a pass makes several updates.
            order = torch.randperm(rows, device=batch["input_ids"].device) if o.mini_batches > 1 else \
                torch.arange(rows, device=batch["input_ids"].device)
            for update_rows in order.tensor_split(o.mini_batches):
                metrics = accumulate_update(step, batch, tensors, update_rows, o)
                update = step.update()
                applied = applied or update.applied
                if update.grad_norm is not None:
                    metrics["grad_norm"] = update.grad_norm
                collected.append(metrics)
        metrics = {**step.mean_metrics(collected), **step.mean_metrics([rollout_metrics])}
        number = run.step + 1
        if number == 1 or number % o.sample_every == 0:
            write_samples(run, number, {"prompt": rollout.prompts, "completion": rollout.texts,
                                        "score": rollout.scores.tolist(),
                                        "advantage": [float(a) for a in tensors["sequence_advantages"]]},
                          o.num_samples)
        return StepResult(metrics, epoch, consumed, applied=applied, progress=("reward/mean", "loss"))

    @torch.no_grad()
    def _rollout(self, step: StepServices) -> tuple[Rollout, int, int, dict[str, Any]]:
        """This process's share of one step's groups; with ``drop_uniform_groups``, refilled from further
        prompt batches (every process draws the same batches, so the data position stays shared)."""
        o, run = self.options, step.run
        wanted = run.stage.config.train.batch_size // step.num_processes
        parts: list[Rollout] = []
        kept_groups = drawn_groups = draws = 0
        while draws <= (o.max_refill_batches if o.drop_uniform_groups else 0):
            epoch, consumed, indices = next(self._prompts)
            draws += 1
            if kept_groups < wanted:
                part = generate_rollout(run, step.policy(), self.rewards, self.engine, shard(indices, step.process_index,
                                                                                step.num_processes),
                                        group_size=o.group_size, max_new_tokens=o.max_new_tokens,
                                        temperature=o.temperature, top_p=o.top_p, batch_size=o.generation_batch_size)
                drawn_groups += len(part.row_ids) // o.group_size
                last_drawn = part
                if o.drop_uniform_groups:
                    part = _informative_groups(part, o.group_size, wanted - kept_groups)
                kept_groups += len(part.row_ids) // o.group_size
                if part.row_ids:
                    parts.append(part)
            if not o.drop_uniform_groups:
                break
            short = step.all_reduce_sum(torch.tensor([float(max(wanted - kept_groups, 0))], device=step.device))
            if float(short[0]) == 0:
                break
        # Decided together: one process raising while the others wait in a collective would hang the run.
        kept_anywhere = float(step.all_reduce_sum(torch.tensor([float(kept_groups)], device=step.device))[0])
        if kept_anywhere == 0:
            where = f"'stages[{run.stage.index}].algorithm"
            raise AlignerError(f"stage '{run.stage.name}': every sampled group had equal scores in {draws} prompt "
                               f"batches; nothing to learn from (raise {where}.max_refill_batches' or "
                               f"{where}.group_size', or check the reward sources)")
        metrics = {"groups_kept": kept_groups / max(drawn_groups, 1), "prompt_batches": float(draws)}
        if not parts:
            # Other processes have groups to learn from: this one runs a group at zero weight, since the
            # update's gradient sync needs every process.
            return last_drawn.select(list(range(o.group_size))), epoch, consumed, {**metrics, "placeholder": True}
        return Rollout.concat(parts), epoch, consumed, metrics

    @torch.no_grad()
    def _score(self, step: StepServices, rollout: Rollout, batch: dict[str, Any],
               metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Old and reference log-probs, adjusted scores, the KL, the estimator's advantages."""
        o, run = self.options, step.run
        # Log-probs of the sampling policy are needed only when the policy moves before the last update
        # of the rollout; with one update the ratio is 1 and the current log-probs stand in for them.
        old = None
        if o.epochs * o.mini_batches > 1:
            with step.accelerator.autocast():
                old = completion_logprobs(step.model, batch, token_level=True).token_logps
        mask = _token_mask(batch)
        reference = None
        if self.needs_reference([]):
            reference = run.stage.reference.logprobs(batch, token_level=True).token_logps
        scores = rollout.scores
        if o.overlong_buffer is not None:
            # DAPO's soft overlong punishment: the same formula as the length_penalty verifier.
            penalty = length_penalty(rollout.prompts, rollout.texts, rollout.completion_ids, max_tokens=o.max_new_tokens,
                                     buffer=o.overlong_buffer, penalty=o.overlong_penalty)
            scores = scores + torch.tensor(penalty, dtype=scores.dtype, device=scores.device)
        token_rewards = None
        kl = None
        if reference is not None:
            if old is None:
                with step.accelerator.autocast():
                    current = completion_logprobs(step.model, batch, token_level=True).token_logps
            else:
                current = old
            kl = kl_per_token(current, reference, mask, o.kl_estimator)
            if o.kl_in == "reward":
                token_rewards = -o.kl_coef * kl
        # Laid out on the completion tokens themselves, before a placeholder's mask is emptied.
        generator_logps = rollout.token_generator_logps(mask)
        placeholder = metrics.pop("placeholder", False)
        if placeholder:  # its rows count nowhere: not in batch statistics, not in the loss
            mask = torch.zeros_like(mask)
        estimated = self.estimator.estimate(AdvantageInputs(scores=scores, mask=mask, group_ids=rollout.group_ids,
                                                            token_rewards=token_rewards,
                                                            all_reduce_sum=step.all_reduce_sum))
        loss_mask = mask & rollout.ended[:, None] if o.mask_truncated else mask
        lengths = mask.sum(-1).float()
        metrics.update({
            "reward/mean": rollout.scores.mean(), "reward/std": _std(rollout.scores),
            "reward/adjusted": scores.mean(), "advantages/mean": masked_mean(estimated.advantages, mask),
            "advantages/abs": masked_mean(estimated.advantages.abs(), mask),
            "response_length": lengths.mean(), "eos_fraction": rollout.ended.float().mean(),
            **{k: to_float(v) for k, v in estimated.metrics.items()},
            **self.rewards.metrics(rollout.sources),
        })
        if kl is not None:
            metrics["kl"] = kl.sum(-1).mean()
        return {"old_logps": old, "reference_logps": reference, "advantages": estimated.advantages,
                "loss_mask": loss_mask, "sequence_advantages": masked_mean_rows(estimated.advantages, mask),
                "generator_logps": generator_logps}


def accumulate_update(step: Any, batch: dict[str, Any], tensors: dict[str, Any], rows: torch.Tensor,
                      options: PolicyGradientOptions) -> dict[str, Any]:
    """Forward and backward of one update's ``rows`` in micro-batches; return the update's metrics.

    Each token's loss is weighted by the aggregation mode with the token and sequence counts of the
    whole update on every process (``step_counts``), and multiplied by the number of processes
    because DDP averages gradients over them: the summed gradients are those of the aggregated loss
    over the global update, whatever the micro-batch size or the number of processes. Every process
    runs the same number of micro-batches (DDP's gradient sync is a collective): a process with
    fewer rows runs a zero-weight repeat of its first one.
    """
    o = options
    size = o.micro_batch_size or max(len(rows), 1)
    # Each micro-batch's rows in rollout order: a group's rows then sit together, and the forward can hold
    # their prompt once (shared-prompt packing) even when the update's rows were shuffled.
    micro = [m.sort().values for m in rows.split(size)] if len(rows) else []
    counts = step_counts([tensors["loss_mask"][m] for m in micro] or [tensors["loss_mask"][:0]], step.all_reduce_sum)
    mine = torch.zeros(step.num_processes, device=step.device)
    mine[step.process_index] = len(micro)
    # At least one: an update with no rows anywhere still observes a (zero) loss for the guard.
    runs = max(int(step.all_reduce_sum(mine).max()), 1)
    norm = o.norm_length or o.max_new_tokens
    collected: list[dict[str, Any]] = []
    total = torch.zeros((), device=step.device)
    for i in range(runs):
        chosen = micro[i] if i < len(micro) else (micro[0] if micro else tensors["loss_mask"].new_zeros(1).long())
        weight = 1.0 if i < len(micro) else 0.0
        sub = rows_of(batch, chosen)
        with step.micro_batch(sync=i == runs - 1):
            logps = completion_logprobs(step.model, sub, token_level=True).token_logps
            # The trainer's log-probs of the rollout policy: stored when the policy moves within the rollout,
            # otherwise this forward's own (the first update's policy is the one that sampled).
            old = tensors["old_logps"][chosen] if tensors["old_logps"] is not None else logps.detach()
            mask = tensors["loss_mask"][chosen]
            per_token, metrics = policy_gradient_loss(logps, old, tensors["advantages"][chosen], mask,
                                                      clip_low=o.clip_low, clip_high=o.clip_high,
                                                      dual_clip=o.dual_clip, ratio_level=o.ratio_level)
            generator = tensors["generator_logps"][chosen]
            metrics.update({f"rollout/{k}": v for k, v in logp_gap(old, generator, mask).items()})
            if o.importance_correction != "none":
                correction, is_metrics = truncated_importance_weights(
                    old, generator, mask, level=o.importance_correction, cap=o.importance_cap)
                per_token = per_token * correction
                metrics.update({f"rollout/{k}": v for k, v in is_metrics.items()})
            if o.kl_in == "loss" and tensors["reference_logps"] is not None:
                per_token = per_token + o.kl_coef * kl_penalty_loss(logps, tensors["reference_logps"][chosen], mask,
                                                                    o.kl_estimator)
            weights = token_weights(mask, o.aggregation, counts, norm) * weight
            loss = (weights * per_token).sum() * step.num_processes
            step.backward(loss, batch=sub)
        total = total + loss.detach()
        if weight or not collected and i == runs - 1:  # a process with no rows reports its placeholder's
            collected.append(metrics)
    metrics = {k: sum(to_float(m[k]) for m in collected) / len(collected) for k in collected[0]}
    # Summed over micro-batches; the runner's mean over processes then gives the global update's loss.
    metrics["loss"] = total
    return metrics


def _token_mask(batch: dict[str, Any]) -> torch.Tensor:
    """The completion-token mask in the per-token layout of ``completion_logprobs(token_level=True)``."""
    from aligner.modeling.logprobs import token_window_start

    return batch["completion_mask"][:, token_window_start(batch) + 1:].bool()


def _informative_groups(rollout: Rollout, group_size: int, limit: int) -> Rollout:
    """The first ``limit`` groups whose scores are not all equal (DAPO's dynamic sampling)."""
    keep: list[int] = []
    groups = 0
    for begin in range(0, len(rollout.row_ids), group_size):
        scores = rollout.scores[begin:begin + group_size]
        if groups < limit and bool((scores != scores[0]).any()):
            keep.extend(range(begin, begin + group_size))
            groups += 1
    return rollout.select(keep)


def masked_mean_rows(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Each row's mean over its masked positions (for the samples table)."""
    m = mask.to(values.dtype)
    return ((values * m).sum(-1) / m.sum(-1).clamp(min=1)).tolist()


def _std(values: torch.Tensor) -> torch.Tensor:
    return values.std() if values.numel() > 1 else values.new_zeros(())
