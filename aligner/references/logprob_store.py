"""A content-addressed, integrity-checked store of reference log-probs on disk.

One entry is one safetensors file ``<key>.safetensors`` holding, per sequence, a 64-bit
fingerprint of its tokens, the sum of its completion log-probs and its completion token count.
``key`` is the SHA-256 of everything that changes those numbers (model weights, token ids, dtype,
precision, the log-prob code's version), so an entry is never stale: a changed input is a new key.

Integrity: the entry's metadata carries a SHA-256 of its tensor bytes; an entry whose file is
truncated, unparsable or whose checksum does not match is reported as corrupt and never used.
An entry may hold only some of its key's sequences (the cached reference scores what a run uses;
a later run adds what it needs by writing the entry again, old values and new); a value under a
key is the same whichever run computed it.

Concurrency: an entry is written to a unique temporary file in the same directory and moved into
place with ``os.replace`` (atomic on POSIX), so two runs that write the same entry at once leave a
complete, correct file (the last writer's sequences); readers never see a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligner.data.cache_files import SUFFIX, default_cache_dir, entry_metadata, remove_entry_file, write_entry
from aligner.errors import PathError, os_error

FORMAT_VERSION = "1"


class CorruptEntry(Exception):
    """A cache entry that is truncated, unreadable or fails its checksum."""


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class Entry:
    """One cached table of reference values."""

    key: str
    fingerprints: torch.Tensor  # int64 [M]
    logps: torch.Tensor  # float32 [M]
    num_tokens: torch.Tensor  # int64 [M]
    metadata: dict[str, str]


class ReferenceCache:
    """The entries in one directory."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir("reference")

    def path(self, key: str) -> Path:
        """Where the entry ``key`` lives."""
        return self.directory / f"{key}{SUFFIX}"

    def load(self, key: str) -> Entry | None:
        """The entry, ``None`` if absent; ``CorruptEntry`` if present but damaged."""
        path = self.path(key)
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CorruptEntry(f"{path}: unreadable ({exc})") from None
        expected = metadata.get("checksum")
        if set(tensors) != {"fingerprints", "logps", "num_tokens"} or expected is None:
            raise CorruptEntry(f"{path}: missing tensors or checksum")
        if _tensor_checksum(tensors) != expected:
            raise CorruptEntry(f"{path}: checksum mismatch")
        if metadata.get("key") != key:
            raise CorruptEntry(f"{path}: holds key {metadata.get('key')!r}")
        return Entry(key, tensors["fingerprints"], tensors["logps"], tensors["num_tokens"], metadata)

    def save(self, key: str, fingerprints: torch.Tensor, logps: torch.Tensor, num_tokens: torch.Tensor,
             info: dict[str, Any] | None = None) -> Path:
        """Write an entry atomically (unique temp file + rename) and return its path."""
        from safetensors.torch import save_file

        tensors = {"fingerprints": fingerprints.to(torch.int64).contiguous().cpu(),
                   "logps": logps.to(torch.float32).contiguous().cpu(),
                   "num_tokens": num_tokens.to(torch.int64).contiguous().cpu()}
        metadata = entry_metadata(key, FORMAT_VERSION, _tensor_checksum(tensors), info)
        try:
            return write_entry(self.directory, key, lambda path: save_file(tensors, path, metadata=metadata))
        except OSError as exc:  # a full disk, a read-only or misplaced cache directory
            raise os_error(exc, self.directory, "could not write the reference cache") from exc

    def remove(self, key: str) -> bool:
        """Delete an entry; ``False`` if it was not there."""
        return remove_entry_file(self.path(key))

    def keys(self) -> list[str]:
        """Keys of the entries present (complete files only; temporary files are skipped)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def describe(self, key: str) -> dict[str, Any]:
        """Size, creation time, row count, what it was computed from, and whether it is intact."""
        path = self.path(key)
        row: dict[str, Any] = {"key": key, "path": str(path), "bytes": path.stat().st_size if path.exists() else 0}
        try:
            entry = self.load(key)
        except CorruptEntry as exc:
            return {**row, "status": "corrupt", "problem": str(exc)}
        if entry is None:
            return {**row, "status": "missing"}
        return {**row, "status": "ok", "sequences": int(entry.fingerprints.numel()),
                "created": entry.metadata.get("created"), **json.loads(entry.metadata.get("info", "{}"))}

    def clear(self) -> int:
        """Delete every entry and stale temporary file; return how many entries were removed.

        Temporary files younger than an hour may belong to a run writing right now and are kept.
        Something named like an entry that is not a file stops it before anything is removed.
        """
        for key in self.keys():
            path = self.path(key)
            if not path.is_file():
                what = "is a directory" if path.is_dir() else "is not a regular file"
                raise PathError(f"{path}: {what}, not a cache entry; nothing was removed (move it out of the cache "
                                "directory)")
        removed = sum(self.remove(key) for key in self.keys())
        if self.directory.is_dir():
            for leftover in self.directory.glob(f".tmp-*{SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - leftover.stat().st_mtime > 3600:
                        leftover.unlink()
        return removed
