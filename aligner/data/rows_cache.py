"""A disk cache of validated rows, so a second ``train`` or ``data check`` on the same file skips parsing.

Reading a data file means parsing every line and validating every row (converting its layout,
mapping its columns); at a million rows that is most of a warm run once the token ids are cached
(``aligner.data.token_cache``). So the first load of a local data file writes what it kept, the
source's ``RowBlock`` (``aligner.data.rows``: every row's serialized dict in one buffer, its byte
offsets and its line/row numbers), as an Arrow IPC file ``<key>.rows.arrow`` beside the tokenized-data
entries, and later loads memory-map that file (``pyarrow.memory_map``) and hand out rows decoded
straight from the mapped pages: nothing is parsed or validated again, the rows are never copied into
the process (the pages are the page cache's, shared by every process that maps them).

Key. The SHA-256 of everything that decides the kept rows: the file's content (its SHA-256, so an
edit that keeps the size and the time is still a new key), the labels the rows are located by
(``data/pairs.jsonl, line 7`` must read the same on a hit), the requested row format, the source's
``format`` and ``columns``, ``max_rows``, the config keys named by column-mapping messages and the
source of the reading and validating code itself. A changed input is a new key; an entry is never
stale.

What an entry holds beside the rows: what the source's ``SourceReport`` says (layout, format, rows
read, valid, rejected) and, for ``aligner data check``, every rejected row's location and message, so
a warm check reports exactly what a cold one did. A load that stops at a bad row writes nothing; an
entry with rejected rows is not used by a load that stops at the first bad row (it reads the file,
and stops there, as before). Only local files are cached (folders, hub ids and in-memory datasets
are read as before), and only files of at least ``MIN_BYTES``.

Integrity. The entry's metadata holds a SHA-256 of the rows' buffer, offsets, keys (the block's
own ``digest``, which the token cache's key reuses, so it is computed once), positions and metadata;
a truncated or damaged file fails to open or fails the check and is rebuilt with a warning, never
used. The cache is on unless ``ALIGNER_TOKEN_CACHE=0`` turns the data caches off.

Once per run. Every process of a distributed run loads the data before any process group exists;
the first takes the entry's lock (``aligner.data.cache_files.locked``), reads and validates the file
and writes the entry; the others wait on the lock and map it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from aligner.data.cache_files import entry_metadata, locked, write_entry
from aligner.data.rows import RowBlock
from aligner.version import __version__

log = logging.getLogger("aligner")

FORMAT_VERSION = "1"
SUFFIX = ".rows.arrow"
# Below this size a file parses in a few milliseconds: an entry would cost more than it saves.
MIN_BYTES = 1 << 20
# A data check's rejected rows travel in the entry's metadata; past this many the entry is not written.
MAX_REJECTED = 10_000


class CorruptEntry(Exception):
    """An entry that is truncated, unreadable or fails its checksum."""


@dataclass
class Loaded:
    """What loading one source gave: its rows, and what its ``SourceReport`` and ``data check`` say."""

    block: RowBlock
    data_format: str
    label: str  # the source's label in reports
    layout: str
    rows_read: int
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (location, message), in order
    created: str = ""  # when a cached entry was written


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the modules whose code decides the kept rows and the entry layout: editing any of
    them is a new key, with no version to bump."""
    # By path, not by importing them: loading imports this module.
    here = Path(__file__).parent
    digest = hashlib.sha256(f"{FORMAT_VERSION};{__version__};".encode())
    for name in ("loading", "sources", "rows", "formats", "converters", "rows_cache"):
        digest.update((here / f"{name}.py").read_bytes())
    for name in ("errors", "protocols"):
        digest.update((here.parent / f"{name}.py").read_bytes())
    return digest.hexdigest()


def file_fingerprint(path: Path) -> tuple[tuple[int, int, int], str]:
    """The file's identity now (size, modification time, inode) and the SHA-256 of its content."""
    from aligner.training.checkpoint_manifest import file_sha256

    before = path.stat()
    _, digest = file_sha256(path)
    return (before.st_size, before.st_mtime_ns, before.st_ino), digest


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _checksum(block: RowBlock, info_text: str) -> str:
    digest = hashlib.sha256(block.digest().encode())
    digest.update(np.ascontiguousarray(block.positions).tobytes())
    digest.update(f"{block.label}\n{block.unit}\n".encode())
    digest.update(info_text.encode())
    return digest.hexdigest()


class RowsCache:
    """The validated-rows entries in one directory (the tokenized-data cache's, by default)."""

    def __init__(self, directory: str | Path | None = None):
        from aligner.data.token_cache import default_token_cache_dir

        self.directory = Path(directory) if directory else default_token_cache_dir()

    def path(self, key: str) -> Path:
        """Where the entry ``key`` lives."""
        return self.directory / f"{key}{SUFFIX}"

    def keys(self) -> list[str]:
        """The keys of the entries present."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def save(self, key: str, loaded: Loaded) -> Path:
        """Write an entry atomically (unique temp file + rename); ``OSError`` if it cannot be written."""
        import pyarrow as pa
        import pyarrow.ipc

        block = loaded.block
        n = len(block)
        offsets = np.ascontiguousarray(block.offsets, dtype=np.int64)
        rows = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n,
                                                [None, pa.py_buffer(offsets), pa.py_buffer(block.buffer)])
        positions = pa.array(np.ascontiguousarray(block.positions, dtype=np.int64))
        info = {"label": loaded.label, "row_label": block.label, "unit": block.unit, "keys": list(block.keys),
                "data_format": loaded.data_format, "layout": loaded.layout, "rows_read": loaded.rows_read,
                "rejected": loaded.rejected}
        info_text = json.dumps(info, sort_keys=True)
        metadata = entry_metadata(key, FORMAT_VERSION, _checksum(block, info_text), None)
        metadata["info"] = info_text
        schema = pa.schema([("row", pa.large_binary()), ("position", pa.int64())], metadata=metadata)
        batch = pa.record_batch([rows, positions], schema=schema)

        def write(path: str) -> None:
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                writer.write_batch(batch)

        return write_entry(self.directory, key, write, suffix=SUFFIX)

    def load(self, key: str) -> Loaded | None:
        """The entry's rows, memory-mapped, ``None`` if absent; ``CorruptEntry`` if present but damaged."""
        import pyarrow as pa
        import pyarrow.ipc

        path = self.path(key)
        if not path.exists():
            return None
        try:
            mapped = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(mapped)
            metadata = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
            if reader.num_record_batches != 1:
                raise CorruptEntry(f"{reader.num_record_batches} record batches")
            batch = reader.get_batch(0)
        except CorruptEntry:
            raise
        except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as exc:
            raise CorruptEntry(f"unreadable ({type(exc).__name__}: {exc})") from None
        if metadata.get("key") != key or metadata.get("format") != FORMAT_VERSION or "checksum" not in metadata:
            raise CorruptEntry("missing or wrong key, format or checksum")
        try:
            info = json.loads(metadata["info"])
            block = _block(batch, info)
            loaded = Loaded(block, str(info["data_format"]), str(info["label"]), str(info["layout"]),
                            int(info["rows_read"]), [(str(a), str(b)) for a, b in info["rejected"]],
                            metadata.get("created", ""))
        except CorruptEntry:
            raise
        except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
            raise CorruptEntry(f"malformed ({type(exc).__name__}: {exc})") from None
        if _checksum(block, metadata["info"]) != metadata["checksum"]:
            raise CorruptEntry("checksum mismatch")
        block.mapped = mapped  # the file stays mapped while its rows are used
        return loaded


def _block(batch: Any, info: dict[str, Any]) -> RowBlock:
    """A ``RowBlock`` over the record batch's memory-mapped buffers (nothing is copied)."""
    import pyarrow as pa

    if batch.schema.names != ["row", "position"] or batch.column(0).type != pa.large_binary() \
            or batch.column(1).type != pa.int64():
        raise CorruptEntry("unexpected columns")
    rows, positions = batch.column(0), batch.column(1)
    n = len(rows)
    if rows.null_count or positions.null_count or rows.offset or positions.offset:
        raise CorruptEntry("unexpected nulls or offsets")
    _, offsets_buffer, data_buffer = rows.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64, count=n + 1)
    if offsets[0] != 0 or offsets[-1] != data_buffer.size or np.any(np.diff(offsets) < 0):
        raise CorruptEntry("inconsistent offsets")
    positions_array = np.frombuffer(positions.buffers()[1], dtype=np.int64, count=n)
    return RowBlock(str(info["row_label"]), str(info["unit"]), memoryview(data_buffer), offsets, positions_array,
                    tuple(str(k) for k in info["keys"]))


def resolve() -> RowsCache | None:
    """The rows cache loads use: the default one, unless ``ALIGNER_TOKEN_CACHE`` turns the data caches off."""
    from aligner.data.token_cache import cache_enabled

    return RowsCache() if cache_enabled() else None


def cached_file(source: Any) -> Path | None:
    """The local data file a source reads, when its rows can be cached: a plain path or a configured
    source naming one existing file of at least ``MIN_BYTES`` (no ``subset``, ``data_files``,
    ``streaming`` or in-memory dataset, whose errors the uncached path reports), else ``None``."""
    if isinstance(source, str | Path):
        path = Path(source)
    elif getattr(source, "dataset", None) is None and not getattr(source, "streaming", False) \
            and getattr(source, "data_files", None) is None and not getattr(source, "subset", None) \
            and isinstance(getattr(source, "path", None), str):
        path = Path(source.path)
    else:
        return None
    try:
        return path if path.is_file() and path.stat().st_size >= MIN_BYTES else None
    except OSError:
        return None


def _reader_versions(path: Path) -> dict[str, str]:
    """The versions of what parses a file that is not JSON Lines (``datasets`` and pyarrow read CSV,
    Parquet and JSON): an upgrade may read the same bytes into other values."""
    if path.suffix.lower() == ".jsonl":
        return {}
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("datasets", "pyarrow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def cache_key(path: Path, content: str, source: Any, data_format: str | None, max_rows: int | None) -> str:
    """The entry key for loading ``source`` (reading ``path``, whose content hashes to ``content``)."""
    from aligner.data.sources import key_text

    plain = isinstance(source, str | Path)  # a plain path has no options (and ``str.format`` is no format)
    columns = {} if plain else dict(getattr(source, "columns", None) or {})
    declared = None if plain else getattr(source, "format", None)
    parts = {"format": FORMAT_VERSION, "code": code_fingerprint(), "content": content,
             "label": str(source) if plain else str(path), "row_label": str(path),
             "data_format": data_format, "declared": declared if isinstance(declared, str | None) else repr(declared),
             "columns": columns,
             "column_keys": {target: key_text(source, "columns", target) for target in columns},
             "max_rows": max_rows, "readers": _reader_versions(path)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_entry(store: RowsCache, key: str) -> Loaded | None:
    """The intact entry, or ``None`` (absent; damaged or unreadable, with a warning)."""
    try:
        return store.load(key)
    except CorruptEntry as exc:
        log.warning("validated-rows cache entry %s is corrupt (%s); reading the data again and replacing it",
                    store.path(key), exc)
    except OSError as exc:
        log.warning("could not read validated-rows cache entry %s (%s); reading the data again", store.path(key), exc)
    return None


def cached_load(store: RowsCache, path: Path, source: Any, data_format: str | None, max_rows: int | None,
                collecting: bool, build: Callable[[], Loaded]) -> tuple[Loaded, bool]:
    """``build()``'s rows, read from ``store`` when an intact entry for this file and these options
    exists, else built and written there (once, by the first process to take the entry's lock). A
    damaged entry is rebuilt with a warning; a cache that cannot be written only warns. An entry with
    rejected rows is of no use unless ``collecting``: the build then stops at the first bad row.
    The second value says whether the rows came from the cache (``build`` was not called)."""
    try:
        identity, content = file_fingerprint(path)
    except OSError:
        return build(), False  # the uncached path reports an unreadable file as it always has
    key = cache_key(path, content, source, data_format, max_rows)

    def usable(loaded: Loaded | None) -> Loaded | None:
        return loaded if loaded is not None and (collecting or not loaded.rejected) else None

    seen = _identity(store.path(key))
    hit = usable(_read_entry(store, key)) if seen is not None else None
    if hit is None:
        with locked(store.directory, key):
            # Another process may have written it while this one waited: read it if the file is new.
            now = _identity(store.path(key))
            if now is not None and now != seen:
                hit = usable(_read_entry(store, key))
            if hit is None:
                loaded = build()
                if _identity(path) != identity:  # the file changed while it was read: its hash is stale
                    return loaded, False
                if len(loaded.rejected) <= MAX_REJECTED:
                    try:
                        store.save(key, loaded)
                    except OSError as exc:
                        log.warning("could not write the validated-rows cache in %s (%s); the next run reads the "
                                    "data again", store.directory, exc)
                        return loaded, False
                    # The rows as every later run sees them: mapped pages (shared with other processes)
                    # rather than this process's own copy, which is freed.
                    mapped = usable(_read_entry(store, key))
                    if mapped is not None:
                        loaded.block = mapped.block
                return loaded, False
    log.info("%s: %d validated rows loaded from cache %s", hit.label, len(hit.block), store.path(key))
    return hit, True
