"""The training loop: one loop for every algorithm.

A stage runs in four visible phases:

1. setup: wrap the model with the PEFT backend, build the reference (it must see the policy
   *before* any update, also when resuming), the optimizer over trainable weights only, the LR
   schedule and batches; then, when resuming, load the checkpoint's weights and training state;
2. evaluate at the start, so every held-out metric has a "before";
3. train: micro-batches -> ``compute_losses`` -> backward, with gradient accumulation, clipping,
   a step, metrics to ``metrics.jsonl`` and lifecycle hooks; evaluation and checkpoints every N
   steps; SIGINT/SIGTERM finish the current step, save a checkpoint and stop;
4. save: the final model (or adapter) with its tokenizer and model card, and final held-out metrics.

What differs between algorithms lives in the loss plugins and the data format, never here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import get_scheduler

from aligner import checkpoint, resume
from aligner.data.batching import LengthGroupedBatches, stage_collate, stage_lengths
from aligner.errors import Interrupted
from aligner.evaluation import evaluate
from aligner.forward import compute_losses, move_to
from aligner.guards import NonFiniteGuard
from aligner.logprobs import can_share_prompts, completion_logprobs, forward_layout
from aligner.model_card import write_model_card
from aligner.plugins import call_hook
from aligner.protocols import PREFERENCE, PROMPT_ONLY, ReferenceContext
from aligner.run import RunState
from aligner.tracking import MetricsFile, Progress, report, to_float

log = logging.getLogger("aligner")


def _batches(run: RunState) -> tuple[LengthGroupedBatches, DataLoader]:
    stage, train = run.stage, run.stage.config.train
    sampler = LengthGroupedBatches(stage_lengths(stage, stage.train_data), train.batch_size,
                                   seed=run.config.seed + stage.index, group_by_length=train.group_by_length)
    loader = DataLoader(stage.train_data.examples, batch_sampler=sampler,
                        collate_fn=stage_collate(stage, run.tokenizer.pad_token_id))
    if run.accelerator.num_processes > 1:
        # Each process takes every num_processes-th batch of the same global order.
        loader = run.accelerator.prepare_data_loader(loader)
    return sampler, loader


def _micro_batches(sampler: LengthGroupedBatches, loader: DataLoader, start: resume.Position, processes: int):
    """Endless ``(epoch, batches consumed in the epoch, batch)``, from a data position on."""
    epoch, skip = start.epoch, start.batches_in_epoch
    while True:
        sampler.set_epoch(epoch, skip=skip)
        consumed = skip
        for batch in loader:
            consumed += processes
            yield epoch, consumed, batch
        epoch, skip = epoch + 1, 0


def _setup(run: RunState, model: torch.nn.Module):
    stage, train = run.stage, run.stage.config.train
    model = stage.peft.apply(model)
    model.train()
    # The reference is set up from the policy before the first update; a frozen copy taken later
    # (or after loading a resumed checkpoint) would be a copy of an already-trained model.
    stage.reference.setup(ReferenceContext(
        policy=model, logprobs_fn=completion_logprobs, peft_backend=stage.peft, device=run.accelerator.device,
        run_dir=str(run.output_dir), stage=stage, autocast=run.accelerator.autocast,
        collate_fn=stage_collate(stage, run.tokenizer.pad_token_id)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"stage '{stage.name}': the PEFT backend '{stage.peft.name}' left no trainable weights")
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    sampler, loader = _batches(run)
    steps_per_epoch = math.ceil(len(sampler) / (train.gradient_accumulation_steps * run.accelerator.num_processes))
    run.total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=int(train.warmup_ratio * run.total_steps),
                              num_training_steps=run.total_steps)
    # The scheduler is not handed to accelerate: its wrapper steps once per process per step,
    # while total_steps here already counts global (all-process) steps.
    model, optimizer = run.accelerator.prepare(model, optimizer)
    _log_pair_layout(run, model)
    # FSDP replaces parameters when it wraps the model: clip the prepared model's ones.
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer, scheduler, sampler, loader, trainable


def _log_pair_layout(run: RunState, model: torch.nn.Module) -> None:
    """Say how preference pairs run: one row with the prompt once, or two rows (and why)."""
    stage = run.stage
    if stage.data_format != PREFERENCE or not run.is_main_process:
        return
    if not stage.config.train.share_prompt:
        log.info("stage '%s': chosen and rejected run as two rows (train.share_prompt is off)", stage.name)
    elif can_share_prompts(model, getattr(stage, "forward_kind", "logprobs")):
        log.info("stage '%s': each preference pair runs as one row holding its prompt once", stage.name)
    else:
        log.info("stage '%s': chosen and rejected run as two rows: this model's wrapper, type or attention "
                 "implementation takes no custom attention mask", stage.name)


def _gathered_weights(run: RunState, model: torch.nn.Module) -> dict | None:
    """Full weights for saving under FSDP/DeepSpeed (a collective: every process must call it)."""
    from accelerate.utils import DistributedType

    if run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return run.accelerator.get_state_dict(model)
    return None


def _mean_metrics(run: RunState, collected: list[dict[str, Any]]) -> dict[str, float]:
    """Average over micro-batches, and over processes when there are several."""
    keys = list(collected[0])
    values = torch.tensor([sum(to_float(m[k]) for m in collected) / len(collected) for k in keys], dtype=torch.float64)
    if run.accelerator.num_processes > 1:
        values = run.accelerator.reduce(values.to(run.accelerator.device), reduction="mean").cpu()
    return dict(zip(keys, values.tolist(), strict=True))


def _save_checkpoint(run: RunState, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                     position: resume.Position, extra_state: dict[str, Any] | None = None) -> Path | None:
    """Write ``step-N`` atomically with everything an exact resume needs (``extra_state`` too)."""
    weights = _gathered_weights(run, model)
    if not run.is_main_process:
        return None
    directory = run.stage_dir / "checkpoints"
    target = directory / f"step-{run.step}"
    state = {"stage": run.stage.name, "step": run.step, "total_steps": run.total_steps}
    checkpoint.write_atomically(target, run.accelerator.unwrap_model(model), run.tokenizer, state,
                                extra=lambda d: {**resume.save_training_state(d, optimizer, scheduler, position),
                                                 **(extra_state or {})},
                                state_dict=weights)
    checkpoint.prune(directory, run.stage.config.train.keep_checkpoints)
    call_hook("on_checkpoint_saved", run=run, step=run.step, path=str(target))
    return target


@contextlib.contextmanager
def stop_on_signals(run: RunState):
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save) instead of dying mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        run.should_stop = True
        run.stop_reason = f"signal {signal.Signals(signum).name}"

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def save_and_raise_if_signalled(run: RunState, saved_at: Path | None, save: Any) -> None:
    """After a SIGINT/SIGTERM: make sure the current step is checkpointed, then stop the run."""
    if not (run.should_stop and (run.stop_reason or "").startswith("signal")):
        return
    if saved_at is None or not saved_at.name.endswith(f"-{run.step}"):
        saved_at = save()
    raise Interrupted(f"stage '{run.stage.name}' stopped by {run.stop_reason} at step {run.step}; checkpoint "
                      f"saved to {saved_at}; continue with --resume")


def evaluate_and_log(run: RunState, model: torch.nn.Module, metrics_file: MetricsFile,
                     evaluate_fn: Any = evaluate) -> dict[str, float]:
    """Evaluate, let ``on_evaluate`` hooks add metrics, then write them; return the metrics."""
    metrics = evaluate_fn(run, model)
    if metrics:
        call_hook("on_evaluate", run=run, step=run.step, metrics=metrics)  # before writing: hooks may add metrics
        metrics_file.write(run.stage.name, run.step, metrics)
    return metrics


def finish_stage(run: RunState, model: torch.nn.Module, metrics_file: MetricsFile, before: dict[str, float],
                 last: dict[str, float], evaluate_fn: Any = evaluate,
                 policy_of: Any = lambda unwrapped: unwrapped) -> tuple[torch.nn.Module, dict[str, float]]:
    """Final evaluation, the final model (atomically, with its model card), the report and ``on_run_end``.

    Returns the model the next stage starts from: ``policy_of`` the unwrapped model (PPO drops its
    value head), released by the PEFT backend (e.g. adapters merged).
    """
    after = evaluate_and_log(run, model, metrics_file, evaluate_fn)
    unwrapped = run.accelerator.unwrap_model(model)
    final = {**{f"train/{k}": v for k, v in last.items()}, **after}
    weights = _gathered_weights(run, model)
    if run.is_main_process:
        checkpoint.write_atomically(run.stage_dir / "final", unwrapped, run.tokenizer,
                                    {"stage": run.stage.name, "step": run.step, "metrics": final},
                                    extra=lambda d: write_model_card(d, run.config, run.stage, final), state_dict=weights)
        report(run.stage.name, before, after)
    call_hook("on_run_end", run=run, metrics=final)
    policy = policy_of(unwrapped)
    release = getattr(run.stage.peft, "release", None)
    return (release(policy) if release else policy), final


def train_stage(run: RunState, model: torch.nn.Module,
                resume_from: Path | None = None) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train one stage from ``model``; return the trained (unwrapped) model and final metrics."""
    if run.stage.data_format == PROMPT_ONLY:
        # Prompt-only data means online RL: the completions are generated during training, so the
        # stage needs a rollout phase before each update. aligner.ppo.stage runs that loop, reusing
        # this module's checkpointing and the same evaluation, hooks and final save.
        from aligner.ppo.stage import train_ppo_stage

        return train_ppo_stage(run, model, resume_from)
    stage, train, accelerator = run.stage, run.stage.config.train, run.accelerator
    metrics_file = MetricsFile(run.output_dir / "metrics.jsonl", enabled=run.is_main_process)

    # 1. setup
    model, optimizer, scheduler, sampler, loader, trainable = _setup(run, model)
    position = resume.Position()
    if resume_from is not None:
        resume.load_weights(accelerator.unwrap_model(model), resume_from)
        position = resume.load_training_state(resume_from, optimizer, scheduler)
        run.step = position.step
        log.info("stage '%s': resumed from %s (step %d)", stage.name, resume_from, run.step)
    run.model = model
    call_hook("on_run_start", run=run)

    # 2. evaluate before training (a resumed stage already did)
    before = evaluate_and_log(run, model, metrics_file) if stage.config.eval.at_start and resume_from is None else {}

    # 3. train
    progress = Progress(f"{stage.name}", run.total_steps, enabled=run.is_main_process)
    micro_batches = _micro_batches(sampler, loader, position, accelerator.num_processes)
    accumulation = train.gradient_accumulation_steps
    guard = NonFiniteGuard(run, train.max_nonfinite_steps)
    after_step = getattr(stage.peft, "after_optimizer_step", None)
    last: dict[str, float] = {}
    saved_at = None
    with stop_on_signals(run):
        while run.step < run.total_steps and not run.should_stop:
            started = time.perf_counter()
            collected, tokens, positions, padding = [], 0, 0, 0
            for micro in range(accumulation):
                epoch, consumed, batch = next(micro_batches)
                # Counted on the collated CPU tensors: no device synchronisation for a metric.
                tokens += int(batch["attention_mask"].sum())
                real, run_positions = forward_layout(model, batch, getattr(stage, "forward_kind", "logprobs"))
                positions += run_positions
                padding += run_positions - real
                batch = move_to(batch, accelerator.device)
                # Gradients sync across processes only on the last micro-batch of a step.
                sync = micro == accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                    loss, metrics = compute_losses(model, stage, batch)
                    accelerator.backward(loss / accumulation)
                collected.append(metrics)
                guard.observe(loss, batch)
            if not guard.step_ok(trainable):
                # A NaN/inf loss or gradient: no update at all (it would poison every weight); counted.
                optimizer.zero_grad(set_to_none=True)
                continue
            grad_norm = accelerator.clip_grad_norm_(trainable, train.max_grad_norm) if train.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            if after_step is not None:  # e.g. AdaLoRA's rank allocation, which reads the gradients
                after_step(accelerator.unwrap_model(model), run.step + 1)
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            position = resume.Position(run.step, epoch, consumed)

            last = _mean_metrics(run, collected)
            if grad_norm is not None:
                last["grad_norm"] = to_float(grad_norm)
            last["learning_rate"] = scheduler.get_last_lr()[0]
            last["epoch"] = epoch + consumed / max(len(sampler), 1)
            last["nonfinite_steps_skipped"] = guard.skipped
            last["tokens_per_second"] = tokens * accelerator.num_processes / (time.perf_counter() - started)
            # Share of the positions the forward pass ran that are padding (length grouping keeps it low).
            last["padding_fraction"] = padding / max(positions, 1)
            call_hook("on_step_end", run=run, step=run.step, metrics=last)
            if run.step % train.log_every == 0 or run.step == run.total_steps:
                metrics_file.write(stage.name, run.step, last)
            run.history.append(last)
            progress.update(run.step, {"loss": last["loss"], "tok/s": last["tokens_per_second"]})

            if train.eval_every and run.step % train.eval_every == 0 and run.step < run.total_steps:
                evaluate_and_log(run, model, metrics_file)
            if train.save_every and run.step % train.save_every == 0:
                saved_at = _save_checkpoint(run, model, optimizer, scheduler, position)
    progress.close()
    save_and_raise_if_signalled(run, saved_at, lambda: _save_checkpoint(run, model, optimizer, scheduler, position))
    if run.should_stop:
        log.info("stage '%s' stopped at step %d: %s", stage.name, run.step, run.stop_reason or "requested by a plugin")

    # 4. save and report
    last.setdefault("nonfinite_steps_skipped", guard.skipped)  # also when no step succeeded
    return finish_stage(run, model, metrics_file, before, last)
