"""Built-in judges, and what they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def saved_model_dir(value: str) -> str:
    """Validate that ``value`` is a directory holding a saved transformers model; return it absolute."""
    path = Path(value).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"no saved model (config.json) in directory '{path}'")
    return str(path.resolve())


def pick_device(requested: str | None) -> torch.device:
    """``requested``, or the GPU when there is one, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_judge_model(model_class: Any, path: str, device: str | None,
                     trust_remote_code: bool) -> tuple[torch.device, Any, torch.nn.Module]:
    """``(device, tokenizer, model)`` of a saved judge model, the model in eval mode on the device.

    ``model_class`` is the transformers auto class to load with (causal LM, sequence classifier).
    """
    from transformers import AutoTokenizer

    where = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = model_class.from_pretrained(path, trust_remote_code=trust_remote_code).to(where).eval()
    return where, tokenizer, model
