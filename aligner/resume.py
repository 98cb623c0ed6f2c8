"""Exact resume: what a checkpoint holds beyond the weights, and how a run continues from it.

A checkpoint (``STAGE/checkpoints/step-N``, written atomically by ``aligner.checkpoint``) holds the
model or adapter (safetensors), ``optimizer.pt`` (optimizer and scheduler state, loaded with
``weights_only=True``), ``rng.pt`` (torch, and CUDA where present) plus the Python and NumPy RNG
states in ``trainer_state.json``, and the data position: how many micro-batches of which epoch
were consumed. Restoring all of it makes an interrupted-and-resumed run equal, bit for bit on CPU,
to one that never stopped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligner.checkpoint import MARKER, complete_checkpoints


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the data position."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # sampler batches of ``epoch`` already consumed (all processes together)


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy RNG states, tensor RNG states)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def restore_rng(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back the RNG states captured by ``capture_rng``."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_training_state(directory: Path, optimizer: Any, scheduler: Any, position: Position) -> dict[str, Any]:
    """Write optimizer/scheduler/RNG tensors into ``directory``; return the JSON part of the state."""
    plain, tensors = capture_rng()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / "optimizer.pt")
    torch.save(tensors, directory / "rng.pt")
    return {"position": position.__dict__, "rng": plain}


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint of a stage, if any (half-written ones have no marker)."""
    found = complete_checkpoints(stage_dir / "checkpoints")
    return found[-1] if found else None


def stage_finished(stage_dir: Path) -> bool:
    """Whether a stage's final model was completely written."""
    return (stage_dir / "final" / MARKER).is_file()


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the checkpoint's weights (full model or peft adapter) into ``model`` in place."""
    from safetensors.torch import load_file

    adapter = directory / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    state = {}
    for shard in sorted(directory.glob("model*.safetensors")):  # not value_head.safetensors etc.
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {unexpected[:5]}")


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``: step, position, RNG and any algorithm state."""
    return json.loads((directory / "trainer_state.json").read_text())


def read_position(directory: Path) -> Position:
    """Where the checkpoint's run stood in its data."""
    return Position(**read_trainer_state(directory)["position"])


def load_training_state(directory: Path, optimizer: Any, scheduler: Any) -> Position:
    """Restore optimizer, scheduler and RNG from a checkpoint; return its position."""
    state = read_trainer_state(directory)
    saved = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng(state["rng"], torch.load(directory / "rng.pt", weights_only=True))
    return Position(**state["position"])
