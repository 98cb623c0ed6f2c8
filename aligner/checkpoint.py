"""Writing checkpoints and final models so that a crash never leaves a usable-looking half copy.

A checkpoint is written into a temporary sibling directory, completed with a ``COMPLETE`` marker,
then renamed into place. Readers take only directories with the marker.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"


def _save_model(model: Any, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_atomically(target: Path, model: Any, tokenizer: Any, state: dict[str, Any],
                     extra: Callable[[Path], dict[str, Any] | None] | None = None) -> Path:
    """Save model, tokenizer and a JSON state file into ``target`` atomically.

    ``extra(directory)`` may write more files into the unfinished directory and return more
    state to merge into ``trainer_state.json``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".tmp-{target.name}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    _save_model(model, tokenizer, temporary)
    if extra is not None:
        state = {**state, **(extra(temporary) or {})}
    (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
    (temporary / MARKER).write_text("ok\n")
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
