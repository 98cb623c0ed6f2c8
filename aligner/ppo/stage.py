"""The PPO stage: the loop of ``aligner.loop`` with a rollout phase before each update.

One step = one rollout batch (``train.batch_size`` prompts):

1. rollout: sample a completion per prompt from the current policy;
2. score: the judge scores each (prompt, completion); the reference gives per-token log-probs;
3. shape: reward = score at the last token - kl_coef * KL per token; GAE gives advantages/returns;
4. update: ``ppo_epochs`` passes over shuffled minibatches, each one optimizer step on the clipped
   policy + value loss; then the KL controller sees the batch's KL.

Setup, held-out evaluation, checkpoints, hooks and the final save reuse the pieces of ``aligner.loop``
and ``aligner.evaluation``; held-out evaluation is judged generation (``eval.generate``), since a
prompt-only stage has no held-out loss to compute.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from aligner.data.batching import LengthGroupedBatches
from aligner.errors import ConfigError
from aligner.evaluation import evaluate_generations
from aligner.forward import move_to
from aligner.logprobs import completion_logprobs
from aligner.plugins import call_hook
from aligner.ppo.gae import gae, masked_mean, masked_whiten
from aligner.ppo.loss import PPOLoss, explained_variance
from aligner.ppo.rewards import (
    AdaptiveKLController,
    FixedKLController,
    adjust_scores,
    kl_per_token,
    shape_rewards,
)
from aligner.ppo.rollout import rollout_batch, sample_completions
from aligner.ppo.value_head import PolicyWithValueHead, hidden_size_of
from aligner.protocols import LossInputs, ReferenceContext, SequenceLogProbs
from aligner.resume import Position, load_training_state, load_weights
from aligner.run import RunState
from aligner.tracking import MetricsFile, Progress, to_float

log = logging.getLogger("aligner")


def ppo_loss_of(stage: Any) -> PPOLoss:
    """The stage's one PPO loss, after checking that the stage's other choices can run PPO."""
    losses = [loss for loss, _ in stage.losses]
    if len(losses) != 1 or not isinstance(losses[0], PPOLoss):
        names = ", ".join(loss.name for loss in losses)
        raise ConfigError(f"stage '{stage.name}' trains on prompt-only data, which needs exactly one 'ppo' "
                          f"loss; it has: {names}")
    if stage.config.train.gradient_accumulation_steps != 1:
        raise ConfigError(f"stage '{stage.name}': PPO updates on minibatches of each rollout ('mini_batch_size'); "
                          f"'stages[{stage.index}].train.gradient_accumulation_steps' must be 1")
    # The per-token KL penalty needs per-token reference log-probs.
    if "token_level" not in inspect.signature(stage.reference.logprobs).parameters:
        raise ConfigError(f"stage '{stage.name}': reference policy '{stage.reference.name}' cannot give per-token "
                          f"log-probs (its logprobs() has no 'token_level' argument), which PPO's KL penalty needs")
    return losses[0]


def _controller(options: PPOLoss.Options) -> FixedKLController | AdaptiveKLController:
    if options.kl_controller == "adaptive":
        return AdaptiveKLController(options.kl_coef, options.kl_target, options.kl_horizon)
    return FixedKLController(options.kl_coef)


def _prompt_batches(run: RunState, start: Position):
    """Endless ``(epoch, batches consumed in the epoch, prompt indices)``, reshuffled every epoch."""
    stage = run.stage
    sampler = LengthGroupedBatches(stage.train_data.lengths(), stage.config.train.batch_size,
                                   seed=run.config.seed + stage.index, group_by_length=False)
    epoch, skip = start.epoch, start.batches_in_epoch
    while True:
        sampler.set_epoch(epoch, skip=skip)
        for consumed, indices in enumerate(sampler, start=skip + 1):
            yield epoch, consumed, indices
        epoch, skip = epoch + 1, 0


def _setup(run: RunState, model: torch.nn.Module, ppo: PPOLoss):
    stage, train, options = run.stage, run.stage.config.train, ppo.options
    policy = stage.peft.apply(model)
    policy.train()
    # As in the main loop: the reference must be taken from the policy before any update.
    stage.reference.setup(ReferenceContext(policy=policy, logprobs_fn=completion_logprobs, peft_backend=stage.peft,
                                           device=run.accelerator.device, run_dir=str(run.output_dir)))
    actor_critic = PolicyWithValueHead(policy, hidden_size_of(model)).to(run.accelerator.device)
    trainable = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    steps_per_epoch = math.ceil(len(stage.train_data.examples) / train.batch_size)
    run.total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    updates = run.total_steps * options.ppo_epochs * math.ceil(train.batch_size / options.mini_batch_size)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=int(train.warmup_ratio * updates),
                              num_training_steps=updates)
    # As in the main loop, the scheduler stays outside accelerate (its wrapper steps once per process).
    actor_critic, optimizer = run.accelerator.prepare(actor_critic, optimizer)
    return actor_critic, optimizer, scheduler, trainable


def _resume(run: RunState, actor_critic: Any, optimizer: Any, scheduler: Any, controller: Any,
            directory: Path) -> Position:
    """Load a PPO checkpoint: policy (or adapter), value head, optimizer, RNG, KL coefficient, position."""
    from safetensors.torch import load_file

    unwrapped = run.accelerator.unwrap_model(actor_critic)
    load_weights(unwrapped.policy, directory)
    heads = load_file(str(directory / "value_head.safetensors"))
    unwrapped.value_head.load_state_dict(heads)
    position = load_training_state(directory, optimizer, scheduler)
    controller.value = json.loads((directory / "trainer_state.json").read_text())["kl_coef"]
    run.step = position.step
    log.info("stage '%s': resumed PPO from %s (step %d, kl_coef %.4g)", run.stage.name, directory, run.step,
             controller.value)
    return position


@torch.no_grad()
def collect_rollout(run: RunState, actor_critic: Any, ppo: PPOLoss, indices: list[int], kl_coef: float) -> dict:
    """Sample, score and shape one rollout batch; return its tensors, texts and metrics."""
    o, tokenizer, device = ppo.options, run.tokenizer, run.accelerator.device
    examples = [run.stage.train_data.examples[i] for i in indices]
    prompt_ids = [e["prompt_ids"] for e in examples]
    unwrapped = run.accelerator.unwrap_model(actor_critic)
    completions = sample_completions(unwrapped.policy, tokenizer, prompt_ids, max_new_tokens=o.max_new_tokens,
                                     temperature=o.temperature, top_p=o.top_p, batch_size=o.generation_batch_size)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    prompts = [e["prompt"] for e in examples]
    scores = torch.tensor(ppo.judge.score(prompts, texts), dtype=torch.float32, device=device)

    batch = move_to(rollout_batch(prompt_ids, completions, tokenizer.pad_token_id), device)
    batch["window_start"] = max(int(batch["prompt_lengths"].min()) - 1, 0)
    with run.accelerator.autocast():
        out = actor_critic(batch)
    reference = run.stage.reference.logprobs(batch, token_level=True)
    mask = out["mask"]
    kl = kl_per_token(out["logps"], reference.token_logps, mask, o.kl_estimator)
    lengths = mask.sum(-1)
    ended = torch.tensor([bool(c) and c[-1] == tokenizer.eos_token_id for c in completions], device=device)
    adjusted = adjust_scores(scores, lengths, ended, length_penalty=o.length_penalty,
                             missing_eos_penalty=o.missing_eos_penalty, clip=o.reward_clip, whiten=o.whiten_rewards)
    rewards = shape_rewards(adjusted, kl, mask, kl_coef)
    advantages, returns = gae(rewards, out["values"], mask, o.gamma, o.lam)
    if o.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    sequence_kl = kl.sum(-1)
    metrics = {
        "reward/mean": scores.mean(), "reward/std": scores.std() if len(scores) > 1 else torch.tensor(0.0),
        "reward/shaped": rewards.sum(-1).mean(), "kl": sequence_kl.mean(), "kl_coef": kl_coef,
        "entropy": masked_mean(out["entropy"], mask), "response_length": lengths.float().mean(),
        "eos_fraction": ended.float().mean(),
        "explained_variance": explained_variance(out["values"], returns, mask),
    }
    return {"batch": batch, "old_logps": out["logps"], "old_values": out["values"], "advantages": advantages,
            "returns": returns, "mask": mask, "prompts": prompts, "texts": texts, "scores": scores.tolist(),
            "sequence_kl": sequence_kl.tolist(), "metrics": metrics}


def ppo_update(run: RunState, actor_critic: Any, optimizer: Any, scheduler: Any, trainable: list, ppo: PPOLoss,
               rollout: dict) -> dict[str, float]:
    """``ppo_epochs`` passes of minibatch updates over one rollout batch; mean metrics of all of them."""
    o, accelerator, train = ppo.options, run.accelerator, run.stage.config.train
    batch = rollout["batch"]
    rows = batch["input_ids"].shape[0]
    sums: dict[str, float] = {}
    count = 0
    stop = False
    for _ in range(o.ppo_epochs):
        if stop:
            break
        for chosen in torch.randperm(rows, device=batch["input_ids"].device).split(o.mini_batch_size):
            sub = {k: v[chosen] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with accelerator.autocast():
                out = actor_critic(sub)
            mask = out["mask"]
            policy = SequenceLogProbs(logps=out["logps"].sum(-1), num_tokens=mask.sum(-1),
                                      token_logps=out["logps"], mask=mask)
            extra = {"values": out["values"], **{k: rollout[k][chosen] for k in
                                                 ("old_logps", "old_values", "advantages", "returns")}}
            output = ppo.compute(LossInputs(data_format=run.stage.data_format, policy=policy, reference=None,
                                            batch=sub, extra=extra))
            accelerator.backward(output.loss)
            grad_norm = accelerator.clip_grad_norm_(trainable, train.max_grad_norm) if train.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = {"loss": output.loss.detach(), **output.metrics}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + to_float(value)
            count += 1
            # Early stop (as SB3's target_kl): the policy has already moved far from the one that sampled.
            if o.max_approx_kl is not None and to_float(output.metrics["approx_kl"]) > o.max_approx_kl:
                stop = True
                break
    return {**{k: v / count for k, v in sums.items()}, "updates": float(count)}


def write_samples(run: RunState, rollout: dict, num_samples: int) -> None:
    """Write a rollout's samples to ``samples/rollout-step-N.jsonl`` and print a few as a table."""
    if not run.is_main_process:
        return
    directory = run.stage_dir / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    rows = list(zip(rollout["prompts"], rollout["texts"], rollout["scores"], rollout["sequence_kl"], strict=True))
    with (directory / f"rollout-step-{run.step}.jsonl").open("w") as handle:
        for prompt, text, score, kl in rows:
            handle.write(json.dumps({"prompt": prompt, "completion": text, "score": score, "kl": kl}) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stage '{run.stage.name}' step {run.step}: rollout samples")
    for column in ("prompt", "completion", "score", "kl"):
        table.add_column(column, justify="right" if column in ("score", "kl") else "left")
    for prompt, text, score, kl in rows[:num_samples]:
        table.add_row(prompt, text, f"{score:.3f}", f"{kl:.3f}")
    Console(file=sys.stdout).print(table)


def evaluate_ppo(run: RunState, actor_critic: Any) -> dict[str, float]:
    """Held-out metrics of a prompt-only stage: judged generations (``eval.generate``) if configured."""
    if run.stage.judge is None or run.stage.eval_data is None or not run.stage.eval_data.examples:
        return {}
    return evaluate_generations(run, run.accelerator.unwrap_model(actor_critic).policy)


def train_ppo_stage(run: RunState, model: torch.nn.Module,
                    resume_from: Path | None = None) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train one prompt-only stage with PPO; return the trained (unwrapped) policy and final metrics."""
    stage, train = run.stage, run.stage.config.train
    ppo = ppo_loss_of(stage)
    metrics_file = MetricsFile(run.output_dir / "metrics.jsonl", enabled=run.is_main_process)

    # 1. setup
    actor_critic, optimizer, scheduler, trainable = _setup(run, model, ppo)
    controller = _controller(ppo.options)
    position = Position()
    if resume_from is not None:
        position = _resume(run, actor_critic, optimizer, scheduler, controller, resume_from)
    run.model = actor_critic
    call_hook("on_run_start", run=run)

    # 2. evaluate before training
    from aligner.loop import (
        _save_checkpoint,
        evaluate_and_log,
        finish_stage,
        save_and_raise_if_signalled,
        stop_on_signals,
    )

    at_start = stage.config.eval.at_start and resume_from is None
    before = evaluate_and_log(run, actor_critic, metrics_file, evaluate_ppo) if at_start else {}

    # 3. train: rollout, then update
    def save() -> Path | None:
        return _save_checkpoint(run, actor_critic, optimizer, scheduler, position,
                                extra_state={"kl_coef": controller.value})

    progress = Progress(stage.name, run.total_steps, enabled=run.is_main_process)
    prompt_batches = _prompt_batches(run, position)
    last: dict[str, float] = {}
    saved_at = None
    with stop_on_signals(run):
        while run.step < run.total_steps and not run.should_stop:
            started = time.perf_counter()
            epoch, consumed, indices = next(prompt_batches)
            rollout = collect_rollout(run, actor_critic, ppo, indices, controller.value)
            last = ppo_update(run, actor_critic, optimizer, scheduler, trainable, ppo, rollout)
            last.update({k: to_float(v) for k, v in rollout["metrics"].items()})
            controller.update(last["kl"], len(indices))
            run.step += 1
            position = Position(run.step, epoch, consumed)
            last["learning_rate"] = scheduler.get_last_lr()[0]
            last["seconds_per_step"] = time.perf_counter() - started
            call_hook("on_step_end", run=run, step=run.step, metrics=last)
            if run.step % train.log_every == 0 or run.step == run.total_steps:
                metrics_file.write(stage.name, run.step, last)
            run.history.append(last)
            progress.update(run.step, {"reward": last["reward/mean"], "kl": last["kl"], "kl_coef": last["kl_coef"]})
            if run.step == 1 or run.step % ppo.options.sample_every == 0:
                write_samples(run, rollout, ppo.options.num_samples)

            if train.eval_every and run.step % train.eval_every == 0 and run.step < run.total_steps:
                evaluate_and_log(run, actor_critic, metrics_file, evaluate_ppo)
            if train.save_every and run.step % train.save_every == 0:
                saved_at = save()
    progress.close()
    save_and_raise_if_signalled(run, saved_at, save)
    if run.should_stop:
        log.info("stage '%s' stopped at step %d: %s", stage.name, run.step, run.stop_reason or "requested by a plugin")

    # 4. save and report: the policy and its value head are saved together, the next stage gets the policy
    return finish_stage(run, actor_critic, metrics_file, before, last, evaluate_ppo,
                        policy_of=lambda unwrapped: unwrapped.policy)
