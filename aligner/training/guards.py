"""Guards against non-finite numbers: skip bad steps, stop after too many, never save bad weights.

A single NaN or inf in a loss or gradient would otherwise poison every weight through the optimizer
step and, silently, every checkpoint after it. The loop hands each micro-batch's loss and row ids to
``NonFiniteGuard.observe`` and asks ``NonFiniteGuard.step_ok`` before the optimizer step: a step with
a non-finite loss or gradient is skipped (no update, no scheduler step), counted and logged with the
rows of its batch; after ``train.max_nonfinite_steps`` consecutive bad steps the run stops with a
``NonFiniteError`` naming the step, the rows and the last good checkpoint (which is left untouched).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import get_total_norm

from aligner.errors import AlignerError
from aligner.training.checkpoint_manifest import complete_checkpoints

log = logging.getLogger("aligner")

ROWS_SHOWN = 8


class NonFiniteError(AlignerError):
    """Training produced non-finite losses/gradients too often, or weights about to be saved are non-finite."""


def describe_rows(locations: list[str]) -> str:
    """``file, lines 3, 9, 12`` for rows of one file; locations joined by ``; `` otherwise."""
    shown = locations[:ROWS_SHOWN]
    more = f" and {len(locations) - ROWS_SHOWN} more" if len(locations) > ROWS_SHOWN else ""
    files = {loc.rpartition(", ")[0] for loc in shown}
    if len(files) == 1 and all(", line " in loc for loc in shown):
        lines = ", ".join(loc.rpartition(" ")[2] for loc in shown)
        return f"{files.pop()}, lines {lines}{more}"
    return "; ".join(shown) + more


class NonFiniteGuard:
    """Decides, step by step, whether the accumulated gradients may be applied."""

    def __init__(self, run: Any, max_consecutive: int):
        self.run = run
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._losses: list[torch.Tensor] = []
        self._row_ids: list[torch.Tensor] = []

    def observe(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        """Remember a micro-batch's loss and row ids until the step is checked."""
        self._losses.append(loss.detach())
        row_ids = batch.get("row_ids")
        if row_ids is not None:
            self._row_ids.append(row_ids)  # read back (a device sync) only for a bad step

    def _rows(self, row_ids: list[torch.Tensor]) -> str:
        rows = self.run.stage.train_rows
        ids = [int(i) for t in row_ids for i in t.tolist()]
        locations = [rows[i].location if 0 <= i < len(rows) else f"row {i}" for i in ids]
        return describe_rows(locations) if locations else "unknown"

    def step_ok(self, parameters: Iterable[torch.nn.Parameter]) -> bool:
        """True when every loss and gradient of this step is finite; otherwise count the skip, or stop."""
        accelerator = self.run.accelerator
        # Under fp16 the gradient scaler owns overflowing gradients: they are expected while it
        # calibrates, and it skips those steps itself. Only the (unscaled) loss is checked then.
        scaled = getattr(accelerator, "scaler", None) is not None
        grads = [] if scaled else [p.grad for p in parameters if p.grad is not None]
        loss_ok = torch.stack([torch.isfinite(x).all() for x in self._losses]).all()
        # One fused norm over all gradients: NaN/inf anywhere makes it non-finite (and a norm that
        # overflows would make clipping useless too). Per-tensor isfinite().all() is ~15x slower on CPU.
        norm = get_total_norm(grads) if grads else None
        if norm is not None and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # FSDP2's gradients are shards (DTensors): their norm is completed across processes
        grad_ok = torch.isfinite(norm).to(loss_ok.device) if norm is not None else loss_ok.new_tensor(True)
        flags = torch.stack([loss_ok, grad_ok]).float()
        if accelerator is not None and accelerator.num_processes > 1:
            # Every process must take the same decision, or their weights would drift apart.
            flags = (accelerator.reduce(flags, reduction="sum") == accelerator.num_processes).float()
        loss_finite, grad_finite = (bool(v) for v in flags.tolist())
        row_ids, self._losses, self._row_ids = self._row_ids, [], []
        if loss_finite and grad_finite:
            self.consecutive = 0
            return True
        rows = self._rows(row_ids)
        self.skipped += 1
        self.consecutive += 1
        what = "loss" if not loss_finite else "gradient"
        step = self.run.step + 1
        stage = self.run.stage.name
        log.warning("stage '%s' step %d: non-finite %s, update skipped (%d skipped so far); batch rows: %s",
                    stage, step, what, self.skipped, rows)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"stage '{stage}': {self.consecutive} consecutive steps with a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={self.max_consecutive}); stopped at step {step} (last update: "
                f"step {self.run.step}); its batch had a non-finite {what} on rows {rows}; last good "
                f"checkpoint: {self._last_checkpoint()}; try a lower learning rate or check those rows"
            )
        return False

    def _last_checkpoint(self) -> str:
        found = complete_checkpoints(Path(self.run.stage_dir) / "checkpoints")
        return str(found[-1]) if found else "none written yet"


def check_finite_weights(model: Any, where: str | Path) -> None:
    """Raise ``NonFiniteError`` if any floating-point weight of ``model`` is NaN or infinite."""
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    floats = [(name, t) for name, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()
    bad = [name for (name, _), ok in zip(floats, finite, strict=True) if not ok]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"refusing to write {where}: non-finite values in {listed}")
