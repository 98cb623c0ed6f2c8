"""Writing checkpoints and final models so that a crash never leaves a usable-looking half copy.

A checkpoint is written into a temporary sibling directory, completed with a ``COMPLETE`` marker,
then renamed into place. Readers take only directories with the marker. A write that fails (a
full disk) removes its temporary directory and raises ``CheckpointError`` naming the previous
checkpoint, which is untouched; a process killed mid-write leaves only a ``.tmp-*`` directory that
readers ignore and the next write replaces. Weights with a NaN or inf are never written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aligner.errors import AlignerError

MARKER = "COMPLETE"


class CheckpointError(AlignerError):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


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
    from aligner.guards import check_finite_weights

    check_finite_weights(model, target)
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
        (temporary / MARKER).write_text("ok\n")
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise CheckpointError(f"could not write {target}: {exc.strerror or exc}; the previous checkpoint is "
                              f"intact: {_previous(target)}") from exc
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if target.exists():
        # Keep the old copy until the new one is in place, then drop it.
        old = target.parent / f".old-{target.name}"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        temporary.rename(target)
        shutil.rmtree(old)
    else:
        temporary.rename(target)
    return target


def recover(target: Path) -> None:
    """Put back a complete ``.old-<name>`` copy when a kill came between replacing renames."""
    old = target.parent / f".old-{target.name}"
    if not target.exists() and (old / MARKER).is_file():
        old.rename(target)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories (``step-N``) that carry the completion marker, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
