"""What aligner's on-disk caches share: where they live and how an entry is written.

Two caches use this: tokenized data (``aligner.data.token_cache``) and reference log-probs
(``aligner.references.logprob_store``). An entry is one ``<key>.safetensors`` file whose metadata holds
its key, format version, checksum, creation time and a JSON ``info``; it is written to a unique
temporary file in the same folder, flushed to disk and renamed into place, so a reader sees a whole
entry or none, and two processes writing the same key cannot corrupt it.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUFFIX = ".safetensors"


def default_cache_dir(kind: str) -> Path:
    """Where aligner caches ``kind`` (``reference`` log-probs, ``tokenized`` data):
    ``$ALIGNER_CACHE_DIR/KIND``, else ``$XDG_CACHE_HOME/aligner/KIND``, else ``~/.cache/aligner/KIND``."""
    if os.environ.get("ALIGNER_CACHE_DIR"):
        return Path(os.environ["ALIGNER_CACHE_DIR"]) / kind
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "aligner" / kind


def entry_metadata(key: str, format_version: str, checksum: str, info: dict[str, Any] | None) -> dict[str, str]:
    """The metadata every cache entry carries (safetensors metadata holds strings only)."""
    return {"key": key, "format": format_version, "checksum": checksum,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "info": json.dumps(info or {}, sort_keys=True)}


def write_entry(directory: Path, key: str, write: Callable[[str], None]) -> Path:
    """Write the entry ``key`` into ``directory`` atomically: ``write(path)`` writes the file at a unique
    temporary path, which is flushed and renamed to ``<key>.safetensors``. ``OSError`` if it cannot be
    written (a full disk, a read-only folder); the temporary file never outlives a failure."""
    target = directory / f"{key}{SUFFIX}"
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".tmp-{key[:16]}-", suffix=SUFFIX, dir=directory)
        os.close(handle)
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    return target
