"""The stage runner: one runner for every algorithm.

A stage runs in four visible phases:

1. setup: wrap the model with the PEFT backend, build the reference (it must see the policy
   *before* any update, also when resuming), let the algorithm build what trains and its data
   stream, then the optimizer (the stage's optimizer plugin, over trainable weights only) and the LR
   schedule; when resuming, load the checkpoint's weights, training state, the algorithm's own state and
   the reference's (a reference that follows training, like ``ema``, continues from its checkpoint);
2. evaluate at the start, so every held-out metric has a "before";
3. train: the algorithm's ``train_step`` (micro-batches of weighted losses, or rollouts and
   updates), each update through ``StepServices.update`` (non-finite guard, clipping, optimizer
   and schedule, the PEFT backend's after-step call); metrics to ``metrics.jsonl`` and lifecycle
   hooks; evaluation and checkpoints every N steps; SIGINT/SIGTERM finish the current step, save a
   checkpoint and stop;
4. save: the final model (or adapter) with its tokenizer and model card, and final held-out metrics.

What differs between algorithms lives in the algorithm plugins (``aligner.algorithms``), the loss
plugins and the data format, never here: this module imports no algorithm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from aligner.algorithms.base import AlgorithmContext, StepServices
from aligner.errors import Interrupted
from aligner.modeling.loading import apply_training_switches
from aligner.modeling.logprobs import completion_logprobs
from aligner.online.reward_sources import give_judges_tokenizer
from aligner.plugins import call_hook
from aligner.protocols import ReferenceContext
from aligner.reporting.metrics import MetricsFile, Progress, report
from aligner.reporting.model_card import write_model_card
from aligner.training import checkpoint_writing, reference_state, resume
from aligner.training.distributed import configure_deepspeed_stage, is_deepspeed
from aligner.training.guards import NonFiniteGuard
from aligner.training.run_state import RunState

log = logging.getLogger("aligner")


def _setup(run: RunState, model: torch.nn.Module, position: resume.Position):
    """Policy, reference, the algorithm's module and data, optimizer and schedule, in that order."""
    from aligner.data.batching import stage_collate

    stage, train, algorithm = run.stage, run.stage.config.train, run.stage.algorithm
    model = stage.peft.apply(model)
    apply_training_switches(model, stage.config.train)  # gradient checkpointing (and activation offload)
    model.train()
    # The reference is set up from the policy before the first update; a frozen copy taken later
    # (or after loading a resumed checkpoint) would be a copy of an already-trained model.
    stage.reference.setup(ReferenceContext(
        policy=model, logprobs_fn=completion_logprobs, peft_backend=stage.peft, device=run.accelerator.device,
        run_dir=str(run.output_dir), stage=stage, autocast=run.accelerator.autocast,
        collate_fn=stage_collate(stage, run.tokenizer.pad_token_id), pad_token_id=run.tokenizer.pad_token_id,
        share_prompt=stage.config.train.share_prompt))
    plan = algorithm.setup(AlgorithmContext(run=run, policy=model, position=position))
    give_judges_tokenizer(stage, run.tokenizer)  # judges built by the algorithm's setup included
    module = plan.module
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise RuntimeError(f"stage '{stage.name}': the PEFT backend '{stage.peft.name}' left no trainable weights")
    optimizer = _build_optimizer(run, module, model, named)
    run.total_steps = train.max_steps or max(1, math.ceil(train.epochs * plan.steps_per_epoch))
    updates = run.total_steps * plan.updates_per_step
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=int(train.warmup_ratio * updates),
                              num_training_steps=updates)
    # The scheduler is not handed to accelerate: its wrapper steps once per process per step,
    # while the schedule here already counts global (all-process) updates.
    if is_deepspeed(run.accelerator):
        configure_deepspeed_stage(run.accelerator, train.batch_size, train.max_grad_norm)
    module, optimizer = run.accelerator.prepare(module, optimizer)
    # FSDP replaces parameters when it wraps the model: clip the prepared model's ones.
    trainable = [p for p in module.parameters() if p.requires_grad]
    return module, optimizer, scheduler, trainable


def _build_optimizer(run: RunState, module: torch.nn.Module, policy: torch.nn.Module,
                     named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The stage's optimizer plugin (``stages[i].optimizer``, default ``adamw``) over the trainable weights."""
    from aligner.errors import PluginError
    from aligner.optimizers import OptimizerContext

    stage, train = run.stage, run.stage.config.train
    optimizer = stage.optimizer.build(OptimizerContext(
        named_parameters=named, module=module, policy=policy, learning_rate=train.learning_rate,
        weight_decay=train.weight_decay, stage=stage))
    # Checked here, not left to fail in the schedule or the first step: the runner steps, schedules
    # and checkpoints it as a torch optimizer.
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise PluginError(f"optimizer '{stage.optimizer.name}' of stage '{stage.name}' built a "
                          f"{type(optimizer).__name__}, not a torch.optim.Optimizer")
    return optimizer


def _gathered_weights(run: RunState, model: torch.nn.Module) -> dict | None:
    """Full weights for saving under FSDP/DeepSpeed (a collective: every process must call it)."""
    from accelerate.utils import DistributedType

    if run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return run.accelerator.get_state_dict(model)
    return None


def save_checkpoint(run: RunState, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    position: resume.Position, extra_state: dict[str, Any] | None = None) -> Path | None:
    """Write ``step-N`` atomically with everything an exact resume needs (``extra_state`` too).

    Under FSDP and DeepSpeed every process writes its shard of the weights and optimizer state (see
    ``resume.save_sharded_shard`` and ``resume.save_deepspeed_shard``); otherwise the main process
    writes the whole state.
    """
    if _sharded(run):
        return _save_sharded_checkpoint(run, model, optimizer, scheduler, position, extra_state)
    weights = _gathered_weights(run, model)
    if not run.is_main_process:
        return None
    directory = run.stage_dir / "checkpoints"
    target = directory / f"step-{run.step}"
    state = {"stage": run.stage.name, "step": run.step, "total_steps": run.total_steps}
    checkpoint_writing.write_atomically(target, run.accelerator.unwrap_model(model), run.tokenizer, state,
                                extra=lambda d: {**resume.save_training_state(d, optimizer, scheduler, position),
                                                 **reference_state.save(d, run.stage.reference),
                                                 **(extra_state or {})},
                                state_dict=weights)
    checkpoint_writing.prune(directory, run.stage.config.train.keep_checkpoints)
    call_hook("on_checkpoint_saved", run=run, step=run.step, path=str(target))
    return target


def _sharded(run: RunState) -> bool:
    """Whether checkpoints are sharded: under FSDP and DeepSpeed (ZeRO) no process holds the whole
    optimizer state."""
    from accelerate.utils import DistributedType

    return run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _save_sharded_checkpoint(run: RunState, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                             position: resume.Position, extra_state: dict[str, Any] | None) -> Path | None:
    """``step-N`` with every process's shard (a collective: every process calls it)."""
    directory = run.stage_dir / "checkpoints"
    target = directory / f"step-{run.step}"
    deepspeed = is_deepspeed(run.accelerator)
    state = {"stage": run.stage.name, "step": run.step, "total_steps": run.total_steps,
             "processes": run.accelerator.num_processes, "sharding": "deepspeed" if deepspeed else "fsdp"}
    unwrapped = run.accelerator.unwrap_model(model)
    save_shard = resume.save_deepspeed_shard if deepspeed else resume.save_sharded_shard

    def write_main(temporary: Path) -> None:
        # The config and tokenizer make the checkpoint self-describing; its weights are the shards.
        config = getattr(unwrapped, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(temporary)
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(temporary)
        full = {**state, **resume.save_sharded_main(temporary, scheduler, position),
                **reference_state.save(temporary, run.stage.reference), **(extra_state or {})}
        (temporary / "trainer_state.json").write_text(json.dumps(full, indent=2))

    checkpoint_writing.write_sharded_atomically(
        target, model, run.is_main_process,
        write_shard=lambda temporary: save_shard(temporary, model, optimizer, run.accelerator.process_index),
        write_main=write_main)
    if not run.is_main_process:
        return None
    checkpoint_writing.prune(directory, run.stage.config.train.keep_checkpoints)
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


def evaluate_and_log(run: RunState, model: torch.nn.Module, metrics_file: MetricsFile) -> dict[str, float]:
    """Evaluate (the algorithm's held-out metrics), let ``on_evaluate`` hooks add metrics, then write them."""
    metrics = run.stage.algorithm.evaluate(run, model)
    if metrics:
        call_hook("on_evaluate", run=run, step=run.step, metrics=metrics)  # before writing: hooks may add metrics
        metrics_file.write(run.stage.name, run.step, metrics)
    return metrics


def finish_stage(run: RunState, model: torch.nn.Module, metrics_file: MetricsFile, before: dict[str, float],
                 last: dict[str, float]) -> tuple[torch.nn.Module, dict[str, float]]:
    """Final evaluation, the final model (atomically, with its model card), the report and ``on_run_end``.

    Returns the model the next stage starts from: the algorithm's policy inside the unwrapped module
    (PPO drops its value head), released by the PEFT backend (e.g. adapters merged).
    """
    after = evaluate_and_log(run, model, metrics_file)
    unwrapped = run.accelerator.unwrap_model(model)
    final = {**{f"train/{k}": v for k, v in last.items()}, **after}
    weights = _gathered_weights(run, model)
    if run.is_main_process:
        checkpoint_writing.write_atomically(run.stage_dir / "final", unwrapped, run.tokenizer,
                                    {"stage": run.stage.name, "step": run.step, "metrics": final},
                                    extra=lambda d: write_model_card(d, run.config, run.stage, final), state_dict=weights)
        report(run.stage.name, before, after)
    call_hook("on_run_end", run=run, metrics=final)
    policy = run.stage.algorithm.policy_of(unwrapped)
    return run.stage.peft.release(policy), final  # the protocol's default returns it unchanged


def _logged_evaluation(run: RunState, step: int) -> dict[str, float]:
    """The held-out metrics this stage logged at ``step`` (its "before", for a resumed stage)."""
    path = run.output_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    found: dict[str, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("stage") == run.stage.name and record.get("step") == step:
            found.update({k: v for k, v in record.items() if k.startswith("eval/")})
    return found


def _resume(run: RunState, model: torch.nn.Module, optimizer: Any, scheduler: Any, directory: Path) -> resume.Position:
    """Load a checkpoint: the algorithm's weights, optimizer/schedule/RNG state, the algorithm's own state."""
    algorithm = run.stage.algorithm
    resume.check_sharding_matches(directory, is_deepspeed(run.accelerator))
    if resume.is_deepspeed_checkpoint(directory):
        # DeepSpeed's engine reads every process's own partitions of the weights and optimizer state.
        position = resume.load_deepspeed_training_state(directory, model, scheduler, run.accelerator.process_index)
    elif resume.is_sharded(directory):
        # Every process reads its own shards of the weights and optimizer state (a collective).
        position = resume.load_sharded_training_state(directory, model, optimizer, scheduler,
                                                       run.accelerator.process_index)
    else:
        algorithm.load_weights(run.accelerator.unwrap_model(model), directory)
        position = resume.load_training_state(directory, optimizer, scheduler)
    trainer_state = resume.read_trainer_state(directory)
    algorithm.load_state_dict(trainer_state.get("algorithm", {}))
    # After the reference's setup (which saw the policy before the checkpoint's weights): a reference
    # that follows training (ema) continues from its checkpointed state, not from a fresh copy.
    reference_state.load(directory, trainer_state, run.stage.reference)
    run.step = position.step
    log.info("stage '%s': resumed from %s (step %d)", run.stage.name, directory, run.step)
    return position


def train_stage(run: RunState, model: torch.nn.Module,
                resume_from: Path | None = None) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train one stage from ``model`` with its algorithm; return the trained (unwrapped) policy and final metrics."""
    stage, train, algorithm = run.stage, run.stage.config.train, run.stage.algorithm
    metrics_file = MetricsFile(run.output_dir / "metrics.jsonl", enabled=run.is_main_process)

    # 1. setup (the data position is read first: the algorithm's data stream starts from it)
    position = resume.read_position(resume_from) if resume_from is not None else resume.Position()
    model, optimizer, scheduler, trainable = _setup(run, model, position)
    if resume_from is not None:
        position = _resume(run, model, optimizer, scheduler, resume_from)
    run.model = model
    call_hook("on_run_start", run=run)

    # 2. evaluate before training (a resumed stage already did: its "before" is read back)
    if resume_from is not None:
        before = _logged_evaluation(run, step=0)
    else:
        before = evaluate_and_log(run, model, metrics_file) if stage.config.eval.at_start else {}

    # 3. train
    progress = Progress(f"{stage.name}", run.total_steps, enabled=run.is_main_process)
    guard = NonFiniteGuard(run, train.max_nonfinite_steps)
    services = StepServices(run, model, optimizer, scheduler, trainable, guard, algorithm.policy_of)
    last: dict[str, float] = {}
    saved_at = None

    def save() -> Path | None:
        # Under its own key: an algorithm's names can never overwrite the runner's (step, position, rng).
        return save_checkpoint(run, model, optimizer, scheduler, position, {"algorithm": algorithm.state_dict()})

    with stop_on_signals(run), contextlib.closing(algorithm):  # close(): a colocated engine frees its memory
        while run.step < run.total_steps and not run.should_stop:
            started = time.perf_counter()
            # The rate this step's updates use: the schedule steps after each update, so reading it
            # afterwards would log the next step's rate.
            learning_rate = scheduler.get_last_lr()[0]
            result = algorithm.train_step(services)
            # The step's data (and sampling RNG) is used up even when the guard skipped every update:
            # a checkpoint after it must not hand the same batch out again.
            position = resume.Position(run.step + int(result.applied), result.epoch, result.batches_in_epoch)
            if not result.applied:
                continue  # every update of the step was skipped by the guard: the step does not count
            run.step += 1
            last = dict(result.metrics)
            last["learning_rate"] = learning_rate
            last["nonfinite_steps_skipped"] = guard.skipped
            last["seconds_per_step"] = time.perf_counter() - started
            call_hook("on_step_end", run=run, step=run.step, metrics=last)
            if run.step % train.log_every == 0 or run.step == run.total_steps:
                metrics_file.write(stage.name, run.step, last)
            run.history.append(last)
            progress.update(run.step, {k: last[k] for k in result.progress if k in last})

            if train.eval_every and run.step % train.eval_every == 0 and run.step < run.total_steps:
                evaluate_and_log(run, model, metrics_file)
            if train.save_every and run.step % train.save_every == 0:
                saved_at = save()
    progress.close()
    save_and_raise_if_signalled(run, saved_at, save)
    if run.should_stop:
        log.info("stage '%s' stopped at step %d: %s", stage.name, run.step, run.stop_reason or "requested by a plugin")

    # 4. save and report
    last.setdefault("nonfinite_steps_skipped", guard.skipped)  # also when no step succeeded
    return finish_stage(run, model, metrics_file, before, last)
