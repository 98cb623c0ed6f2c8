"""What aligner's on-disk caches share: where they live and how an entry is written.

Three caches use this: tokenized data (``aligner.data.token_cache``), validated rows
(``aligner.data.rows_cache``, in the same folder) and reference log-probs
(``aligner.references.logprob_store``). An entry is one ``<key>.safetensors`` file (``<key>.rows.arrow``
for rows) whose metadata holds its key, format version, checksum, creation time and a JSON ``info``; it
is written to a unique temporary file in the same folder, flushed to disk and renamed into place, so a
reader sees a whole entry or none, and two processes writing the same key cannot corrupt it.

An entry is built once however many processes ask for it at once: the builder holds ``locked`` (an
exclusive ``flock`` on ``.<key>.lock``), the others wait on it and then read the entry. The lock file
is removed by its holder, so none is left in the folder after a build.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Callable, Iterator
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


def write_entry(directory: Path, key: str, write: Callable[[str], None], suffix: str = SUFFIX) -> Path:
    """Write the entry ``key`` into ``directory`` atomically: ``write(path)`` writes the file at a unique
    temporary path, which is flushed and renamed to ``<key><suffix>`` (``.safetensors`` by default).
    ``OSError`` if it cannot be written (a full disk, a read-only folder); the temporary file never
    outlives a failure."""
    target = directory / f"{key}{suffix}"
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".tmp-{key[:16]}-", suffix=suffix, dir=directory)
        os.close(handle)
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    return target


@contextlib.contextmanager
def locked(directory: Path, key: str) -> Iterator[None]:
    """Hold the entry ``key``'s lock (an exclusive ``flock`` on ``directory/.<key>.lock``) while it is built.

    The holder removes the lock file before releasing it, so lock files do not pile up in the folder.
    A process that was waiting on the removed file then finds the name gone (or naming a newer file)
    and locks again by name: two processes never both hold the lock of one key. The lock goes with
    the process: one that dies releases it (its file is left, and taken over by the next builder).
    Where no lock can be taken (an unwritable folder, a file system without locks) each process goes
    on alone.
    """
    try:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
    except (ImportError, OSError):
        yield
        return
    path = directory / f".{key}.lock"
    handle = None
    while True:
        try:
            handle = open(path, "ab")  # noqa: SIM115 - closed below, which unlocks
        except OSError:
            handle = None
            break
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:  # no locks here: go on alone, and leave the file to whoever made it
            handle.close()
            handle = None
            break
        try:
            held, named = os.fstat(handle.fileno()), os.stat(path)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                break
        except OSError:  # removed by the holder this process waited on
            pass
        handle.close()
    try:
        yield
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still held: a waiter then sees the name gone and locks again
            handle.close()


def remove_entry_file(path: Path) -> bool:
    """Delete one cache entry's file; ``False`` if it was not there, a located ``PathError`` if it cannot be
    removed (a read-only cache, a directory named like an entry)."""
    from aligner.errors import os_error

    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise os_error(exc, path, "could not remove cache entry") from exc
