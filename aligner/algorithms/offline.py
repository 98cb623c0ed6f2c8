"""``offline``, the default algorithm: the stage's weighted loss plugins over a dataset.

One training step is ``train.gradient_accumulation_steps`` micro-batches of length-grouped rows,
each through ``aligner.training.micro_batch.compute_losses`` (the policy, the reference only when a loss needs
it, the losses) and a backward pass, then one update. SFT, DPO and its relatives, KTO, ORPO and
reward-model training are all this algorithm with different losses and data formats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from aligner.algorithms.base import Algorithm, AlgorithmContext, AlgorithmSetup, StepResult, StepServices
from aligner.data.batching import LengthGroupedBatches, stage_collate, stage_lengths
from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.modeling.logprobs import can_share_prompts, forward_layout
from aligner.protocols import PREFERENCE, SFT, UNPAIRED
from aligner.training.evaluation import evaluate
from aligner.training.micro_batch import compute_losses, move_to
from aligner.training.resume import Position
from aligner.training.run_state import RunState

log = logging.getLogger("aligner")


class OfflineAlgorithm(Algorithm):
    """Weighted loss plugins over micro-batches of a dataset, with gradient accumulation."""

    name = "offline"
    data_formats = (SFT, PREFERENCE, UNPAIRED)

    def __init__(self, options: Algorithm.Options | None = None):
        super().__init__(options)
        self._sampler: LengthGroupedBatches | None = None
        self._micro_batches: Iterator[tuple[int, int, dict[str, Any]]] | None = None
        self._layout_logged = False

    def check_stage(self, stage: Any) -> None:
        """At least one loss, and every loss trains on the stage's data format."""
        if not stage.losses:
            raise ConfigError(f"stage '{stage.name}' has no losses: list at least one under "
                              f"'stages[{stage.index}].losses' (e.g. [{{name: sft}}] or [{{name: dpo}}])")
        for loss, _ in stage.losses:
            if stage.data_format not in loss.data_formats:
                raise ConfigError(
                    f"loss '{loss.name}' in stage '{stage.name}' trains on {'/'.join(loss.data_formats)} data, but "
                    f"{stage.config.data.train} is {stage.data_format} data (set 'stages[{stage.index}].data.format' "
                    "if the guess is wrong)")

    def needs_reference(self, losses: list[tuple[Any, float]]) -> bool:
        """Whether any loss reads reference log-probs."""
        return any(loss.needs_reference for loss, _ in losses)

    def setup(self, context: AlgorithmContext) -> AlgorithmSetup:
        """Length-grouped batches of the train rows, sharded over processes; the policy trains."""
        run = context.run
        stage, train = run.stage, run.stage.config.train
        self._sampler = LengthGroupedBatches(stage_lengths(stage, stage.train_data), train.batch_size,
                                             seed=run.config.seed + stage.index, group_by_length=train.group_by_length)
        loader = DataLoader(stage.train_data.examples, batch_sampler=self._sampler,
                            collate_fn=stage_collate(stage, run.tokenizer.pad_token_id))
        processes = run.accelerator.num_processes
        if processes > 1:
            # Each process takes every num_processes-th batch of the same global order.
            loader = run.accelerator.prepare_data_loader(loader)
        self._micro_batches = _micro_batches(self._sampler, loader, context.position, processes)
        steps_per_epoch = -(-len(self._sampler) // (train.gradient_accumulation_steps * processes))
        return AlgorithmSetup(module=context.policy, steps_per_epoch=steps_per_epoch)

    def train_step(self, step: StepServices) -> StepResult:
        """``gradient_accumulation_steps`` micro-batches of weighted losses, then one update."""
        assert self._micro_batches is not None and self._sampler is not None, "setup() was not called"
        run, model = step.run, step.model
        stage = run.stage
        if not self._layout_logged:
            _log_pair_layout(run, model)
            self._layout_logged = True
        accumulation = stage.config.train.gradient_accumulation_steps
        collected, tokens, positions, padding = [], 0, 0, 0
        started = time.perf_counter()
        for micro in range(accumulation):
            epoch, consumed, batch = next(self._micro_batches)
            # Counted on the collated CPU tensors: no device synchronisation for a metric.
            tokens += int(batch["attention_mask"].sum())
            real, run_positions = forward_layout(model, batch, stage.forward_kind)
            positions += run_positions
            padding += run_positions - real
            batch = move_to(batch, step.device)
            # Gradients sync across processes only on the last micro-batch of a step.
            with step.micro_batch(sync=micro == accumulation - 1):
                loss, metrics = compute_losses(model, stage, batch)
                step.backward(loss / accumulation, observed=loss, batch=batch)
            collected.append(metrics)
        update = step.update()
        if not update.applied:
            return StepResult({}, epoch, consumed, applied=False)
        metrics = step.mean_metrics(collected)
        if update.grad_norm is not None:
            metrics["grad_norm"] = float(update.grad_norm)
        metrics["epoch"] = epoch + consumed / max(len(self._sampler), 1)
        metrics["tokens_per_second"] = tokens * step.num_processes / (time.perf_counter() - started)
        # Share of the positions the forward pass ran that are padding (length grouping keeps it low).
        metrics["padding_fraction"] = padding / max(positions, 1)
        return StepResult(metrics, epoch, consumed, progress=("loss", "tokens_per_second"))

    def evaluate(self, run: RunState, model: torch.nn.Module) -> dict[str, float]:
        """The losses' metrics on the eval rows, and judged generations when configured."""
        return evaluate(run, model)


def _micro_batches(sampler: LengthGroupedBatches, loader: DataLoader, start: Position, processes: int):
    """Endless ``(epoch, batches consumed in the epoch, batch)``, from a data position on."""
    epoch, skip = start.epoch, start.batches_in_epoch
    while True:
        sampler.set_epoch(epoch, skip=skip)
        consumed = skip
        for batch in loader:
            consumed += processes
            yield epoch, consumed, batch
        epoch, skip = epoch + 1, 0


def _log_pair_layout(run: RunState, model: torch.nn.Module) -> None:
    """Say how preference pairs run: one row with the prompt once, or two rows (and why)."""
    stage = run.stage
    if stage.data_format != PREFERENCE or not run.is_main_process:
        return
    if not stage.config.train.share_prompt:
        log.info("stage '%s': chosen and rejected run as two rows (train.share_prompt is off)", stage.name)
    elif can_share_prompts(model, stage.forward_kind):
        log.info("stage '%s': each preference pair runs as one row holding its prompt once", stage.name)
    else:
        log.info("stage '%s': chosen and rejected run as two rows: this model's wrapper, type or attention "
                 "implementation takes no custom attention mask", stage.name)


@hookimpl
def register_algorithms(register):
    """Register ``offline``."""
    register(OfflineAlgorithm)
