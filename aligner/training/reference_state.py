"""A reference policy's own state in checkpoints, and its after-update call.

A reference that follows training (the built-in ``ema``) has state an exact resume needs: its
``state_dict()`` is written into every checkpoint and handed back to ``load_state_dict`` on resume.
Tensors (which may be as large as the model) go to ``reference_state.safetensors`` inside the
checkpoint directory, the rest under ``reference`` in ``trainer_state.json``. Both are written before
the checkpoint's manifest, so the manifest covers them and ``aligner verify`` checks them.

The three members are optional (``aligner.protocols.ReferencePolicy`` declares them with their
defaults, which the registry gives a class that lacks them): by default a reference saves nothing,
restores nothing and ignores updates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aligner.protocols import ReferenceStep
from aligner.training.checkpoint_manifest import CheckpointError, read_checkpoint_tensors

STATE_FILE = "reference_state.safetensors"
STATE_KEY = "reference"  # its JSON part in trainer_state.json


def after_update(reference: Any, policy: torch.nn.Module, updates: int) -> None:
    """Call the reference's ``after_optimizer_step`` after an applied update."""
    reference.after_optimizer_step(ReferenceStep(policy=policy, updates=updates))


def _split(state: dict[str, Any], path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``state`` without its tensors (nested dicts walked); the tensors go to ``tensors`` keyed by
    the JSON list of their key path (so any key, dots and slashes included, round-trips)."""
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"reference state keys must be strings, got {key!r} at {'/'.join(path) or 'the top'}")
        if isinstance(value, torch.Tensor):
            tensors[json.dumps([*path, key])] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            plain[key] = _split(value, (*path, key), tensors)
        else:
            plain[key] = value
    return plain


def save(directory: Path, reference: Any) -> dict[str, Any]:
    """Write the reference's tensors into ``directory``; return what goes into ``trainer_state.json``.

    Called by the main process inside the checkpoint's ``extra`` step, before the manifest.
    """
    state = reference.state_dict()
    if not state:
        return {}
    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, (), tensors)
    if tensors:
        from safetensors.torch import save_file

        save_file(tensors, str(directory / STATE_FILE))
    return {STATE_KEY: {"state": plain, "tensors": bool(tensors)}}


def load(directory: Path, trainer_state: dict[str, Any], reference: Any) -> None:
    """Hand the checkpoint's reference state back to ``load_state_dict`` (``{}`` when it has none)."""
    saved = trainer_state.get(STATE_KEY) or {}
    state = saved.get("state", {}) if isinstance(saved, dict) else {}
    if not isinstance(state, dict):
        raise CheckpointError(f"{directory / 'trainer_state.json'} has no valid '{STATE_KEY}' state")
    if isinstance(saved, dict) and saved.get("tensors"):
        for key, tensor in read_checkpoint_tensors(directory / STATE_FILE).items():
            *parents, name = json.loads(key)
            node = state
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = tensor
    reference.load_state_dict(state)
