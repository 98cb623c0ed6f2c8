"""The contract between the stage runner and an algorithm.

The runner (``aligner.training.runner``) calls, in order: ``setup(AlgorithmContext)`` once, after the PEFT
backend wrapped the model and the reference was built from it; then ``train_step(StepServices)``
once per training step until the stage ends. Inside a step the algorithm computes losses and
calls ``step.backward(...)`` and ``step.update()`` as often as it needs: once per step for the
offline losses, once per minibatch of a rollout for PPO. ``update`` is where the runner applies
everything every algorithm shares: the non-finite guard, gradient clipping, the optimizer and LR
schedule, and the PEFT backend's after-step call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from aligner.protocols import Options
from aligner.reporting.metrics import to_float
from aligner.training import reference_state
from aligner.training.distributed import is_deepspeed
from aligner.training.resume import Position, load_weights
from aligner.training.run_state import RunState

log = logging.getLogger("aligner")


@dataclass
class AlgorithmContext:
    """What an algorithm sets itself up from.

    ``policy`` is the model to train, already wrapped by the stage's PEFT backend and in train mode;
    the stage's reference was built from it. ``position`` is where a resumed stage continues in its
    data (``Position()`` for a fresh stage).
    """

    run: RunState
    policy: torch.nn.Module
    position: Position


@dataclass
class AlgorithmSetup:
    """What ``setup`` returns: the module whose trainable weights the optimizer updates (the policy,
    or the policy with a value head), how many training steps one pass over the train data takes, and
    how many optimizer updates one training step makes (the LR schedule's length is their product)."""

    module: torch.nn.Module
    steps_per_epoch: int
    updates_per_step: int = 1


@dataclass
class StepResult:
    """What one training step reports: its metrics (means over the step and the processes), where the
    data stream stands after it, whether any update was applied (a step whose every update the
    non-finite guard skipped is not counted), and the names of the metrics the progress line shows."""

    metrics: dict[str, float]
    epoch: int
    batches_in_epoch: int
    applied: bool = True
    progress: tuple[str, ...] = ()


@dataclass
class Update:
    """The outcome of ``StepServices.update``: applied or skipped, and the gradient norm before clipping."""

    applied: bool
    grad_norm: torch.Tensor | None = None


class StepServices:
    """What the runner lends an algorithm during training: the prepared model and the shared update."""

    def __init__(self, run: RunState, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 trainable: list[torch.nn.Parameter], guard: Any, policy_of: Any):
        self.run = run
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.trainable = trainable
        self.guard = guard
        self._policy_of = policy_of
        self._after_step = run.stage.peft.after_optimizer_step  # the protocol's default does nothing
        self._reference = run.stage.reference
        # Under DeepSpeed its engine (the prepared model) owns backward, clipping and the optimizer step.
        self._engine = model if is_deepspeed(run.accelerator) else None
        self._boundary = True  # whether the current micro-batch ends an update (DeepSpeed's accumulation boundary)

    @property
    def accelerator(self) -> Any:
        """The run's ``accelerate.Accelerator``."""
        return self.run.accelerator

    @property
    def device(self) -> torch.device:
        """Where tensors of this process go."""
        return self.run.accelerator.device

    @property
    def num_processes(self) -> int:
        """How many processes train together (1 without a distributed launch)."""
        return self.run.accelerator.num_processes

    @property
    def process_index(self) -> int:
        """This process's rank."""
        return self.run.accelerator.process_index

    def unwrapped(self) -> torch.nn.Module:
        """The trained module without its DDP/FSDP wrapper."""
        return self.run.accelerator.unwrap_model(self.model)

    def policy(self) -> torch.nn.Module:
        """The policy inside the unwrapped module (for sampling)."""
        return self._policy_of(self.unwrapped())

    @contextlib.contextmanager
    def micro_batch(self, sync: bool = True) -> Iterator[None]:
        """Run a forward and backward under autocast; with ``sync=False`` gradients are only
        accumulated locally (DDP syncs them on the last micro-batch of an update)."""
        accelerator = self.run.accelerator
        self._boundary = sync
        try:
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.model), accelerator.autocast():
                yield
        finally:
            self._boundary = True

    def backward(self, loss: torch.Tensor, observed: torch.Tensor | None = None,
                 batch: dict[str, Any] | None = None) -> None:
        """Backpropagate ``loss``; the guard checks ``observed`` (default: ``loss``) and, for a bad
        step, names ``batch``'s rows."""
        if self._engine is not None:
            # Not accelerate's backward: under DeepSpeed it also steps, before the guard could look.
            self._engine.set_gradient_accumulation_boundary(self._boundary)
            self._engine.backward(loss)
        else:
            self.run.accelerator.backward(loss)
        self.guard.observe(loss if observed is None else observed, batch or {})

    def update(self) -> Update:
        """Apply the accumulated gradients: skipped (and counted) if any loss or gradient since the
        last update is non-finite, else clipped to ``train.max_grad_norm``, an optimizer and LR
        schedule step, the PEFT backend's after-step call (e.g. AdaLoRA's rank allocation) and the
        reference's (``after_weights_changed``)."""
        max_norm = self.run.stage.config.train.max_grad_norm
        if self._engine is not None:
            return self._deepspeed_update(max_norm)
        if not self.guard.step_ok(self.trainable):
            # A NaN/inf loss or gradient: no update at all (it would poison every weight).
            self.optimizer.zero_grad(set_to_none=True)
            return Update(applied=False)
        grad_norm = self.run.accelerator.clip_grad_norm_(self.trainable, max_norm) if max_norm else None
        self.optimizer.step()
        self.scheduler.step()
        # Reads the gradients, so before they are zeroed.
        self._after_step(self._policy_of(self.unwrapped()), self.scheduler.last_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.after_weights_changed()
        return Update(applied=True, grad_norm=grad_norm)

    def _deepspeed_update(self, max_norm: float | None) -> Update:
        """``update`` under DeepSpeed: its engine clips (to ``train.max_grad_norm``, set in its config),
        steps and zeroes. The gradients are its partitions, not ``p.grad``: the guard sees whether any
        is non-finite through DeepSpeed's own check (a collective), and the engine skips such a step
        and clears them itself. A step whose loss alone is non-finite cannot be dropped that way: it is
        applied, and said."""
        engine, stage = self._engine, self.run.stage.name
        has_overflow = getattr(engine.optimizer, "has_overflow", None)
        flags = []
        # Under fp16 DeepSpeed's loss scaler owns overflowing gradients (expected while it calibrates;
        # it skips those steps itself), as accelerate's GradScaler does otherwise: only the loss is checked.
        if has_overflow is not None and not engine.fp16_enabled():
            overflow = has_overflow(partition_gradients=engine.zero_optimization_partition_gradients())
            flags = [_Flag(torch.tensor(float("nan") if overflow else 0.0))]
        ok = self.guard.step_ok(flags)
        engine.step()
        applied = engine.was_step_applied()
        if not applied and ok:
            # Under fp16 these are the loss scaler's calibration skips (expected); otherwise a surprise.
            level = logging.DEBUG if engine.fp16_enabled() else logging.WARNING
            log.log(level, "stage '%s' step %d: DeepSpeed skipped the update (non-finite gradients)", stage,
                    self.run.step + 1)
        if applied and not ok:
            log.warning("stage '%s' step %d: the loss was non-finite but the gradients were not: DeepSpeed applied "
                        "the update", stage, self.run.step + 1)
        if not applied:
            return Update(applied=False)
        self.scheduler.step()
        self._after_step(self._policy_of(self.unwrapped()), self.scheduler.last_epoch)
        self.after_weights_changed()
        grad_norm = engine.get_global_grad_norm() if max_norm else None
        return Update(applied=True, grad_norm=None if grad_norm is None else torch.as_tensor(grad_norm))

    def after_weights_changed(self) -> None:
        """Tell the stage's reference an update was applied (its optional ``after_optimizer_step``,
        e.g. ``ema`` folding the new weights in). ``update()`` calls it; an algorithm that changes the
        weights without ``update()`` (MeZO) calls it after its own update, once the LR schedule stepped."""
        reference_state.after_update(self._reference, self._policy_of(self.unwrapped()), self.scheduler.last_epoch)

    def mean_metrics(self, collected: list[dict[str, Any]]) -> dict[str, float]:
        """Average metric dicts (micro-batches, updates) and then over processes."""
        if not collected:
            return {}
        # A key missing from some entries (``grad_norm`` of a skipped update) is averaged over those
        # that have it; the guard's decisions are shared, so every process has the same keys.
        keys = list(dict.fromkeys(k for m in collected for k in m))
        values = torch.tensor([_mean([to_float(m[k]) for m in collected if k in m]) for k in keys],
                              dtype=torch.float64)
        if self.num_processes > 1:
            values = self.run.accelerator.reduce(values.to(self.device), reduction="mean").cpu()
        return dict(zip(keys, values.tolist(), strict=True))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over processes (itself with one process), for batch-wide statistics."""
        if self.num_processes == 1:
            return tensor
        return self.run.accelerator.reduce(tensor.to(self.device), reduction="sum").to(tensor.device)


@dataclass
class _Flag:
    """DeepSpeed's verdict on its gradient partitions, shaped as the guard reads gradients (NaN: non-finite)."""

    grad: torch.Tensor


def require_token_level_reference(stage: Any, algorithm: str) -> None:
    """A ``ConfigError`` unless the stage's reference gives per-token log-probs (``logprobs(batch,
    token_level=True)``), which a per-token KL penalty needs; ``cached`` precomputes a dataset's
    sequences and has none."""
    import inspect

    from aligner.errors import ConfigError

    if "token_level" not in inspect.signature(stage.reference.logprobs).parameters:
        raise ConfigError(f"stage '{stage.name}': reference policy '{stage.reference.name}' cannot give per-token "
                          f"log-probs (its logprobs() has no 'token_level' argument), which {algorithm}'s KL penalty "
                          f"needs ('stages[{stage.index}].reference'; 'auto' picks one that can)")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class Algorithm:
    """Base class of algorithms: defaults for every member of ``aligner.protocols.Algorithm`` except
    ``setup`` and ``train_step``. Subclasses set ``name``, ``data_formats`` and ``Options``."""

    name: ClassVar[str]
    data_formats: ClassVar[tuple[str, ...]]

    class Options(Options):
        """No options."""

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else self.Options()

    def check_stage(self, stage: Any) -> None:
        """Accept every stage whose data format is in ``data_formats``."""

    def needs_reference(self, losses: list[tuple[Any, float]]) -> bool:
        """No reference log-probs."""
        return False

    def generation_tokens(self) -> int:
        """Nothing generated during training."""
        return 0

    def setup(self, context: AlgorithmContext) -> AlgorithmSetup:
        """Build what trains and the data stream."""
        raise NotImplementedError

    def train_step(self, step: StepServices) -> StepResult:
        """One training step."""
        raise NotImplementedError

    def evaluate(self, run: RunState, model: torch.nn.Module) -> dict[str, float]:
        """Judged generations for held-out prompts (``eval.generate``), when the stage has them."""
        from aligner.training.evaluation import evaluate_generations

        if run.stage.eval_rewards is None or run.stage.eval_data is None or not run.stage.eval_data.examples:
            return {}
        return evaluate_generations(run, self.policy_of(run.accelerator.unwrap_model(model)))

    def state_dict(self) -> dict[str, Any]:
        """No extra state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (``state`` is what ``state_dict`` returned at the checkpoint)."""

    def load_weights(self, module: torch.nn.Module, directory: Path) -> None:
        """The checkpoint's model or adapter weights, loaded into ``module``."""
        load_weights(module, directory)

    def policy_of(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` is the policy."""
        return module

    def close(self) -> None:
        """Release what the algorithm holds once its stage's training loop ends (a generation engine's
        connections or GPU memory). Default: nothing."""
