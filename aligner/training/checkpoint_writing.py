"""Writing checkpoints and final models so that a crash never leaves a usable-looking half copy.

A checkpoint is written into a temporary sibling directory, completed with a ``COMPLETE`` marker,
then renamed into place. Readers take only directories with the marker. A write that fails (a
full disk) removes its temporary directory and raises ``CheckpointError`` naming the previous
checkpoint, which is untouched; a process killed mid-write leaves only a ``.tmp-*`` directory that
readers ignore and the next write replaces. Weights with a NaN or inf are never written.

Under FSDP and DeepSpeed a checkpoint is written by every process (``write_sharded_atomically``):
each writes its shard into the same temporary directory, and after a barrier the main process writes
the manifest, which covers every process's files, and renames the directory. The final model is
gathered and written by the main process alone (``write_atomically`` with the gathered ``state_dict``).


The marker is also the checkpoint's manifest (``aligner.training.checkpoint_manifest``), written
last, so a checkpoint without its manifest is a checkpoint without its marker, i.e. incomplete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aligner.training.checkpoint_manifest import (
    MARKER,
    CheckpointError,
    complete_checkpoints,
    manifest,
)
from aligner.training.guards import NonFiniteError, check_finite_weights


def _save_model(model: Any, tokenizer: Any, directory: Path, state_dict: dict | None = None) -> None:
    if state_dict is not None:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _previous(target: Path) -> str:
    if (target / MARKER).is_file():
        return str(target)
    found = complete_checkpoints(target.parent)
    return str(found[-1]) if found else "none"


def write_atomically(target: Path, model: Any, tokenizer: Any, state: dict[str, Any],
                     extra: Callable[[Path], dict[str, Any] | None] | None = None,
                     state_dict: dict | None = None) -> Path:
    """Save model, tokenizer and a JSON state file into ``target`` atomically.

    ``extra(directory)`` may write more files into the unfinished directory and return more
    state to merge into ``trainer_state.json``. ``state_dict`` replaces the model's own (the
    gathered full weights under FSDP or DeepSpeed ZeRO-3). Non-finite weights are never written.
    """
    # Under FSDP the model's own tensors are shards, and checking them here (on the main process
    # alone) would start a collective the other processes never join: check the gathered copy.
    check_finite_weights(model if state_dict is None else _StateDictOnly(state_dict), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    temporary = target.parent / f".tmp-{target.name}"
    if temporary.exists():
        shutil.rmtree(temporary)  # left by a process killed mid-write
    try:
        temporary.mkdir()
        _save_model(model, tokenizer, temporary, state_dict)
        if extra is not None:
            state = {**state, **(extra(temporary) or {})}
        (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
        # Last, once every other file is final: the marker holds their sizes and hashes. It is only
        # visible under the checkpoint's name after the rename below, so the manifest is atomic too.
        (temporary / MARKER).write_text(json.dumps(manifest(temporary), indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise CheckpointError(f"could not write {target}: {exc.strerror or exc}; the previous checkpoint is "
                              f"intact: {_previous(target)}") from exc
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _replace(target, temporary)
    return target


class _StateDictOnly:
    """A stand-in exposing only ``state_dict()``, so the finite-weights guard reads given tensors."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _replace(target: Path, temporary: Path) -> None:
    """Move a finished temporary directory into place, keeping the old copy until the new one is there."""
    if target.exists():
        old = target.parent / f".old-{target.name}"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        temporary.rename(target)
        shutil.rmtree(old)
    else:
        temporary.rename(target)


# --- sharded checkpoints (FSDP, DeepSpeed): every process writes, the main one completes -------

SHARDED_DIR = "sharded"  # torch.distributed.checkpoint files: one per process, plus .metadata
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's engine checkpoint: every process's ZeRO partitions


def _all_errors(error: str | None) -> list[str]:
    """Every process's error (``None`` where it had none), in rank order: a collective, so it is
    also the barrier between the steps of a sharded write, and every process learns the outcome."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [error] if error else []
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return [f"process {rank}: {e}" for rank, e in enumerate(gathered) if e]


def _describe(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _local_nonfinite(model: Any) -> list[str]:
    """Names of this process's weight shards holding a NaN or inf (no collective: local data only)."""
    import torch

    def nonfinite(tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())

    bad = []
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's own shard
        if nonfinite(local):
            bad.append(name)
    # DeepSpeed ZeRO-3 leaves empty placeholders in the module: each process's partition is ``ds_tensor``.
    bad += [name for name, parameter in model.named_parameters() if nonfinite(getattr(parameter, "ds_tensor", None))]
    return bad


def write_sharded_atomically(target: Path, model: Any, is_main: bool, write_shard: Callable[[Path], None],
                             write_main: Callable[[Path], None]) -> Path:
    """Write a checkpoint that every process holds a part of, atomically; every process must call this.

    The main process prepares the temporary directory; then every process writes its own files into
    it (``write_shard``: its shard of the weights and optimizer state, its RNG state); once all have
    finished (a barrier), the main process adds the files only it writes (``write_main``), the
    manifest covering every process's files, and renames the directory into place. Each step ends
    with an exchange of errors, so a failure on any process (a full disk, non-finite weights) raises
    ``CheckpointError`` on every process and leaves the previous checkpoint as it was, instead of
    one process raising while the others wait in the next collective.
    """
    temporary = target.parent / f".tmp-{target.name}"
    bad = _local_nonfinite(model)
    nonfinite = _all_errors(f"non-finite values in {', '.join(bad[:3])}" if bad else None)
    if nonfinite:
        raise NonFiniteError(f"refusing to write {target}: {'; '.join(nonfinite)}")

    def step(action: Callable[[], None], run_here: bool) -> None:
        error = None
        if run_here:
            try:
                action()
            except Exception as exc:  # reported on every process below, then raised as CheckpointError
                error = _describe(exc)
        errors = _all_errors(error)
        if errors:
            if is_main:
                shutil.rmtree(temporary, ignore_errors=True)
            raise CheckpointError(f"could not write {target}: {'; '.join(errors)}; the previous checkpoint is "
                                  f"intact: {_previous(target)}")

    def prepare() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        if temporary.exists():
            shutil.rmtree(temporary)  # left by a run killed mid-write
        temporary.mkdir()

    def complete() -> None:
        write_main(temporary)
        (temporary / MARKER).write_text(json.dumps(manifest(temporary), indent=1, sort_keys=True) + "\n")
        _replace(target, temporary)

    step(prepare, is_main)
    step(lambda: write_shard(temporary), True)  # the exchange after it is the barrier: all shards are written
    step(complete, is_main)
    return target


def recover(target: Path) -> None:
    """Put back a complete ``.old-<name>`` copy when a kill came between replacing renames."""
    old = target.parent / f".old-{target.name}"
    if not target.exists() and (old / MARKER).is_file():
        old.rename(target)


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)

