"""Built-in judges, and what they share."""

from __future__ import annotations

from pathlib import Path


def saved_model_dir(value: str) -> str:
    """Validate that ``value`` is a directory holding a saved transformers model; return it absolute."""
    path = Path(value).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"no saved model (config.json) in directory '{path}'")
    return str(path.resolve())
