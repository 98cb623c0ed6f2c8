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


def give_tokenizer(judge: Any, tokenizer: Any) -> None:
    """Give the judge the policy's tokenizer (``set_tokenizer``: optional, a no-op unless the judge
    defines it; the registry gives every judge class the default).

    Called once, before the judge's first ``score`` or ``compare``: by the training run (the judges of an
    online algorithm, of its reward sources and of ``eval.generate``) and by ``aligner label``.
    """
    judge.set_tokenizer(tokenizer)


def load_judge_model(model_class: Any, path: str, device: str | None,
                     trust_remote_code: bool) -> tuple[torch.device, Any, torch.nn.Module]:
    """``(device, tokenizer, model)`` of a saved judge model, the model in eval mode on the device.

    ``model_class`` is the transformers auto class to load with (causal LM, sequence classifier).
    """
    from transformers import AutoTokenizer

    from aligner.modeling.loading import pick_device

    where = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = model_class.from_pretrained(path, trust_remote_code=trust_remote_code).to(where).eval()
    return where, tokenizer, model
