"""``aligner cache list|info|clear``: look into and empty the reference log-prob cache, or (``--kind data``)
the data caches' folder: tokenized ids and validated rows (``aligner.data.token_cache``,
``aligner.data.rows_cache``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aligner.errors import ConfigError, PathError

if TYPE_CHECKING:  # aligner.references.logprob_store imports torch: only when the command runs, so `aligner --help` stays fast
    from aligner.references.logprob_store import ReferenceCache


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``cache`` subcommand to the CLI."""
    cache = sub.add_parser("cache", help="list, inspect or clear the reference log-prob cache (or the data caches)")
    cache.add_argument("action", choices=["list", "info", "clear"])
    cache.add_argument("key", nargs="?", help="entry key (or a unique prefix) for info/clear")
    cache.add_argument("--kind", choices=["reference", "data"], default="reference",
                       help="reference log-probs (default), or data: tokenized ids and validated rows")
    cache.add_argument("--dir", default=None, help="cache directory (default: $ALIGNER_CACHE_DIR/reference, or "
                                                   "$ALIGNER_CACHE_DIR/tokenized for --kind data; else under "
                                                   "~/.cache/aligner)")
    cache.add_argument("--json", action="store_true", help="print JSON")
    cache.set_defaults(handler=run)


class DataCache:
    """The data caches' folder as ``aligner cache`` sees it: tokenized-data entries
    (``<key>.safetensors``) and validated-rows entries (``<key>.rows.arrow``), listed, checked and
    removed alike."""

    def __init__(self, directory: str | Path | None = None):
        from aligner.data.rows_cache import RowsCache
        from aligner.data.token_cache import TokenCache

        self.tokens = TokenCache(directory)
        self.rows = RowsCache(self.tokens.directory)
        self.directory = self.tokens.directory

    def path(self, key: str) -> Path:
        """Where the entry ``key`` lives (a rows entry when there is one by that key)."""
        rows = self.rows.path(key)
        return rows if rows.exists() else self.tokens.path(key)

    def keys(self) -> list[str]:
        """Keys of the entries present, of both kinds (complete files only)."""
        from aligner.data.cache_files import SUFFIX

        if not self.directory.is_dir():
            return []
        tokens = [p.name[:-len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}") if not p.name.startswith(".")]
        return sorted({*tokens, *self.rows.keys()})

    def describe(self, key: str) -> dict[str, Any]:
        """Kind, size, creation time, what it holds, and whether it is intact."""
        from aligner.data import rows_cache, token_cache

        path = self.path(key)
        row: dict[str, Any] = {"key": key, "path": str(path), "bytes": path.stat().st_size if path.exists() else 0}
        if path == self.rows.path(key):
            try:
                loaded = self.rows.load(key)
            except (rows_cache.CorruptEntry, OSError) as exc:
                return {**row, "kind": "rows", "status": "corrupt", "problem": str(exc)}
            if loaded is None:
                return {**row, "kind": "rows", "status": "missing"}
            return {**row, "kind": "rows", "status": "ok", "created": loaded.created, "source": loaded.label,
                    "rows": len(loaded.block), "rejected": len(loaded.rejected), "data_format": loaded.data_format,
                    "what": f"rows of {loaded.label}: {len(loaded.block)} {loaded.data_format} rows"}
        try:
            metadata, arrays = token_cache.read_entry(path)
            if metadata.get("key") != key or token_cache._checksum(arrays) != metadata.get("checksum"):
                raise token_cache.CorruptEntry("missing key or checksum mismatch")
            info = json.loads(metadata.get("info", "{}"))
        except FileNotFoundError:
            return {**row, "kind": "tokens", "status": "missing"}
        except (token_cache.CorruptEntry, OSError, ValueError, KeyError, TypeError) as exc:
            return {**row, "kind": "tokens", "status": "corrupt", "problem": str(exc)}
        examples = len(arrays["row_id"]) if "row_id" in arrays else 0
        return {**row, "kind": "tokens", "status": "ok", "created": metadata.get("created"), "examples": examples,
                **info, "what": f"token ids: {examples} {info.get('data_format', '?')} examples"}

    def remove(self, key: str) -> bool:
        """Delete an entry; ``False`` if it was not there."""
        from aligner.data.cache_files import remove_entry_file

        return remove_entry_file(self.path(key))

    def clear(self) -> int:
        """Delete every entry, temporary files over an hour old and lock files no process holds (left by
        one that died); return how many entries were removed."""
        for key in self.keys():
            path = self.path(key)
            if not path.is_file():
                raise PathError(f"{path}: is not a regular file, not a cache entry; nothing was removed (move it out "
                                "of the cache directory)")
        removed = sum(self.remove(key) for key in self.keys())
        if self.directory.is_dir():
            for leftover in self.directory.glob(".tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - leftover.stat().st_mtime > 3600:
                        leftover.unlink()
            for lock in self.directory.glob(".*.lock"):
                _remove_unheld_lock(lock)
        return removed


def _remove_unheld_lock(path: Path) -> None:
    """Remove a lock file that no process holds (taken without waiting, removed while held)."""
    try:
        import fcntl

        handle = open(path, "ab")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a build is under way
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                path.unlink()


def _resolve(cache: ReferenceCache | DataCache, prefix: str) -> str:
    matches = [k for k in cache.keys() if k.startswith(prefix)]
    if len(matches) != 1:
        raise ConfigError(f"cache key '{prefix}' matches {len(matches)} entries in {cache.directory}")
    return matches[0]


def run(args: argparse.Namespace) -> int:
    """Handle ``aligner cache ...``."""
    from aligner.references.logprob_store import ReferenceCache

    data = getattr(args, "kind", "reference") == "data"
    cache = DataCache(args.dir) if data else ReferenceCache(args.dir)
    # A missing directory is an empty cache; a file in its place is a mistake that listing would hide.
    if cache.directory.exists() and not cache.directory.is_dir():
        raise PathError(f"{cache.directory}: is a file, not a directory (the cache directory, --dir or "
                        f"$ALIGNER_CACHE_DIR/{'tokenized' if data else 'reference'})")
    if args.action == "clear":
        if args.key:
            cache.remove(_resolve(cache, args.key))
            removed = 1
        else:
            removed = cache.clear()
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.directory}")
        return 0
    keys = [_resolve(cache, args.key)] if args.key else cache.keys()
    rows = [cache.describe(k) for k in keys]
    if args.json or args.action == "info":
        print(json.dumps(rows if args.action == "list" or len(rows) != 1 else rows[0], indent=2))
        return 0
    print(f"{cache.directory}: {len(rows)} entries, {sum(r['bytes'] for r in rows)} bytes")
    for r in rows:
        what = (r.get("what") or f"{r.get('stage', '?')}/{r.get('split', '?')} {r.get('sequences', '?')} sequences") \
            if r["status"] == "ok" else r["status"]
        print(f"{r['key'][:16]}  {r['bytes']:>10}  {r.get('created') or '-':25}  {what}")
    return 0
