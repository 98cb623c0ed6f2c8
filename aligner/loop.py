"""The training loop: one loop for every algorithm.

A stage runs in four visible phases:

1. setup: wrap the model with the PEFT backend, build the reference (it must see the policy
   *before* any update), the optimizer over trainable weights only, the LR schedule and batches;
2. evaluate at the start, so every held-out metric has a "before";
3. train: micro-batches -> ``compute_losses`` -> backward, with gradient accumulation, clipping,
   a step, metrics to ``metrics.jsonl`` and lifecycle hooks; evaluation and checkpoints every N steps;
4. save: the final model (or adapter) with its tokenizer, and the final held-out metrics.

What differs between algorithms lives in the loss plugins and the data format, never here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import get_scheduler

from aligner import checkpoint
from aligner.data.batching import LengthGroupedBatches, collate
from aligner.evaluation import evaluate
from aligner.forward import compute_losses, move_to
from aligner.logprobs import completion_logprobs
from aligner.plugins import call_hook
from aligner.protocols import PROMPT_ONLY, ReferenceContext
from aligner.run import RunState
from aligner.tracking import MetricsFile, Progress, report, to_float

log = logging.getLogger("aligner")


def _batches(run: RunState) -> tuple[LengthGroupedBatches, DataLoader]:
    stage, train = run.stage, run.stage.config.train
    sampler = LengthGroupedBatches(stage.train_data.lengths(), train.batch_size, seed=run.config.seed + stage.index,
                                   group_by_length=train.group_by_length)
    loader = DataLoader(stage.train_data.examples, batch_sampler=sampler,
                        collate_fn=partial(collate, data_format=stage.data_format,
                                           pad_token_id=run.tokenizer.pad_token_id))
    if run.accelerator.num_processes > 1:
        loader = run.accelerator.prepare_data_loader(loader)
    return sampler, loader


def _micro_batches(sampler: LengthGroupedBatches, loader: DataLoader):
    """Endless micro-batches, epoch after epoch, with the epoch number."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def _setup(run: RunState, model: torch.nn.Module):
    stage, train = run.stage, run.stage.config.train
    model = stage.peft.apply(model)
    model.train()
    # The reference is set up from the policy before the first update; a frozen copy taken later
    # would be a copy of an already-trained model.
    stage.reference.setup(ReferenceContext(policy=model, logprobs_fn=completion_logprobs, peft_backend=stage.peft,
                                           device=run.accelerator.device, run_dir=str(run.output_dir)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"stage '{stage.name}': the PEFT backend '{stage.peft.name}' left no trainable weights")
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    sampler, loader = _batches(run)
    steps_per_epoch = math.ceil(len(sampler) / train.gradient_accumulation_steps)
    run.total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=int(train.warmup_ratio * run.total_steps),
                              num_training_steps=run.total_steps)
    model, optimizer, scheduler = run.accelerator.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, sampler, loader, trainable


def _mean_metrics(collected: list[dict[str, Any]]) -> dict[str, float]:
    keys = collected[0].keys()
    return {k: sum(to_float(m[k]) for m in collected) / len(collected) for k in keys}


def _save_checkpoint(run: RunState, model: torch.nn.Module, optimizer: Any, scheduler: Any, epoch: int) -> None:
    if not run.is_main_process:
        return
    directory = run.stage_dir / "checkpoints"
    target = directory / f"step-{run.step}"
    state = {"stage": run.stage.name, "step": run.step, "epoch": epoch, "total_steps": run.total_steps}
    checkpoint.write_atomically(target, run.accelerator.unwrap_model(model), run.tokenizer, state)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, target / "optimizer.pt")
    checkpoint.prune(directory, run.stage.config.train.keep_checkpoints)
    call_hook("on_checkpoint_saved", run=run, step=run.step, path=str(target))


def train_stage(run: RunState, model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train one stage from ``model``; return the trained (unwrapped) model and final metrics."""
    if run.stage.data_format == PROMPT_ONLY:
        # Prompt-only data means online RL: the completions are generated during training, so the
        # stage needs a rollout phase before each update. aligner.ppo.stage runs that loop, reusing
        # this module's checkpointing and the same evaluation, hooks and final save.
        from aligner.ppo.stage import train_ppo_stage

        return train_ppo_stage(run, model)
    stage, train, accelerator = run.stage, run.stage.config.train, run.accelerator
    metrics_file = MetricsFile(run.output_dir / "metrics.jsonl", enabled=run.is_main_process)

    # 1. setup
    model, optimizer, scheduler, sampler, loader, trainable = _setup(run, model)
    run.model = model
    call_hook("on_run_start", run=run)

    # 2. evaluate before training
    before = evaluate(run, model) if stage.config.eval.at_start else {}
    if before:
        metrics_file.write(stage.name, 0, before)
        call_hook("on_evaluate", run=run, step=0, metrics=before)

    # 3. train
    progress = Progress(f"{stage.name}", run.total_steps, enabled=run.is_main_process)
    micro_batches = _micro_batches(sampler, loader)
    accumulation = train.gradient_accumulation_steps
    last: dict[str, float] = {}
    epoch = 0
    while run.step < run.total_steps and not run.should_stop:
        started = time.perf_counter()
        collected, tokens = [], 0
        for micro in range(accumulation):
            epoch, batch = next(micro_batches)
            batch = move_to(batch, accelerator.device)
            tokens += int(batch["attention_mask"].sum())
            # Gradients sync across processes only on the last micro-batch of a step.
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss, metrics = compute_losses(model, stage, batch)
                accelerator.backward(loss / accumulation)
            collected.append(metrics)
        grad_norm = accelerator.clip_grad_norm_(trainable, train.max_grad_norm) if train.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1

        last = _mean_metrics(collected)
        last["learning_rate"] = scheduler.get_last_lr()[0]
        last["epoch"] = epoch + 1
        last["tokens_per_second"] = tokens * accelerator.num_processes / (time.perf_counter() - started)
        if grad_norm is not None:
            last["grad_norm"] = to_float(grad_norm)
        call_hook("on_step_end", run=run, step=run.step, metrics=last)
        if run.step % train.log_every == 0 or run.step == run.total_steps:
            metrics_file.write(stage.name, run.step, last)
        run.history.append(last)
        progress.update(run.step, {"loss": last["loss"], "tok/s": last["tokens_per_second"]})

        if train.eval_every and run.step % train.eval_every == 0 and run.step < run.total_steps:
            held_out = evaluate(run, model)
            if held_out:
                metrics_file.write(stage.name, run.step, held_out)
                call_hook("on_evaluate", run=run, step=run.step, metrics=held_out)
        if train.save_every and run.step % train.save_every == 0:
            _save_checkpoint(run, model, optimizer, scheduler, epoch)
    progress.close()
    if run.should_stop:
        log.info("stage '%s' stopped at step %d: %s", stage.name, run.step, run.stop_reason or "requested by a plugin")

    # 4. save and report
    after = evaluate(run, model)
    if after:
        metrics_file.write(stage.name, run.step, after)
        call_hook("on_evaluate", run=run, step=run.step, metrics=after)
    unwrapped = accelerator.unwrap_model(model)
    final = {**{f"train/{k}": v for k, v in last.items()}, **after}
    if run.is_main_process:
        checkpoint.write_atomically(run.stage_dir / "final", unwrapped, run.tokenizer,
                                    {"stage": stage.name, "step": run.step, "metrics": final})
        report(stage.name, before, after)
    call_hook("on_run_end", run=run, metrics=final)
    release = getattr(stage.peft, "release", None)
    return (release(unwrapped) if release else unwrapped), final
