"""A disk cache of tokenized rows, so a second ``train`` or ``data check`` on the same data skips tokenizing.

Layout and conventions follow the reference cache (``aligner.references.logprob_store``): one safetensors file
``<key>.safetensors`` per entry under ``$ALIGNER_CACHE_DIR/tokenized`` (else
``$XDG_CACHE_HOME/aligner/tokenized``, else ``~/.cache/aligner/tokenized``), written to a unique
temporary file and moved into place with ``os.replace``, its tensor bytes covered by a SHA-256 in
its metadata. Safetensors holds plain arrays only: nothing in an entry is ever executed (no pickle).

Key. The SHA-256 of everything that decides the token ids: the rows' prompt and completion values
in order, the data format, the tokenizer (its full serialization, special tokens and BOS rule), the
template (its spec, or the tokenizer's chat template), ``max_length``, ``max_prompt_length`` and the
source of the tokenizing code itself. A changed input is a new key, so an entry is never stale.
A tokenizer or template that cannot be fingerprinted (a hand-made object, a wrapper) is never
cached: a wrong hit would silently train on other ids.

What an entry holds: per kept example its row index and its ids (each field one flat int32 array
plus offsets), per input row its untruncated length, and the index and reason of every dropped row.
Everything else of an example (the judge's prompt text, a label, a margin) and every location is
read back from the rows themselves, which were loaded and validated before this cache is asked:
each located error of loading and validation is raised on a warm run exactly as on a cold one,
and a row that failed validation never reaches the tokenizer, let alone the cache.

Once per run. Every process of a distributed run asks for the same entry before any process group
exists; the first takes the entry's lock file (``building``), tokenizes and writes the entry, and
the others wait on the lock and read it: the rows are tokenized once, not once per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from aligner.data.cache_files import SUFFIX, default_cache_dir, entry_metadata, locked, write_entry
from aligner.data.examples import CompactExamples, compact_from_arrays, flatten
from aligner.data.rows import Row, Rows
from aligner.data.tokenized import COMPLETION_FIELDS, TokenizedData, prompt_for_judge
from aligner.protocols import UNPAIRED
from aligner.version import __version__

log = logging.getLogger("aligner")

FORMAT_VERSION = "1"
# Below this many rows tokenizing takes milliseconds: an entry would cost more than it saves.
MIN_ROWS = 1000
# ``ALIGNER_TOKEN_CACHE=0`` (or ``off``/``false``/``no``) turns the cache off.
DISABLE_ENV = "ALIGNER_TOKEN_CACHE"


class CorruptEntry(Exception):
    """An entry that is truncated, unreadable, fails its checksum or does not fit the rows."""


def default_token_cache_dir() -> Path:
    """``tokenized`` beside the reference cache (``aligner.data.cache_files.default_cache_dir``)."""
    return default_cache_dir("tokenized")


def cache_enabled() -> bool:
    """Whether the environment leaves the tokenized-data cache on (the default)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


# ---------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the modules whose code decides the ids and the entry layout (tokenizing, rendering
    templates, packing examples, this one): editing any of them is a new key, with no version to bump.

    ``tokenize`` is read as a file, not imported: it calls this module, which must not import it back."""
    from aligner.data import examples, templates, tokenized

    digest = hashlib.sha256(f"{FORMAT_VERSION};{__version__};".encode())
    for source in (Path(__file__).with_name("tokenize.py"), *(Path(m.__file__) for m in (tokenized, templates, examples))):
        digest.update(source.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of the tokenizer's full definition, or ``None`` where it cannot be trusted to be complete.

    A fast (``tokenizers``) tokenizer serializes its normalizer, pre-tokenizer, model (vocabulary
    and merges), added tokens and post-processor in ``to_str()``; a sentencepiece one its model
    proto. Only real ``transformers`` tokenizers of a known class count: a wrapper could change
    what ``__call__`` returns while exposing the wrapped tokenizer's serialization.
    """
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return None
    if getattr(tokenizer, "is_fast", False):
        definition = tokenizer.backend_tokenizer.to_str().encode()
    else:
        proto = getattr(getattr(tokenizer, "sp_model", None), "serialized_model_proto", None)
        if proto is None:
            return None
        definition = proto() + json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    digest = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}\n".encode())
    digest.update(definition)
    # What the Python side adds: special tokens (EOS in templates) and whether a BOS is prepended.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    extra = {"special": tokenizer.special_tokens_map, "bos": tokenizer.bos_token_id, "probe": list(probe)}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def template_fingerprint(template: Any) -> str | None:
    """A hash of what renders text, or ``None`` for a template object of an unknown kind."""
    from aligner.data.templates import Template, TokenizerTemplate

    if isinstance(template, Template):
        described = {"kind": "yaml", "name": template.name, "spec": template.spec, "eos": template.eos}
    elif isinstance(template, TokenizerTemplate):
        described = {"kind": "tokenizer", "chat_template": getattr(template.tokenizer, "chat_template", None)}
    else:
        return None
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def rows_fingerprint(rows: Sequence[Row], data_format: str) -> str:
    """A hash of what each row gives the tokenizer (its prompt and completion values), in order.

    Locations, labels and margins are not part of it: they are read back from the rows on a hit.
    Rows loaded by ``load_validated`` (``aligner.data.rows.Rows``) are hashed by their stored bytes,
    without decoding a row (their labels and margins are then part of the hash: a change only misses).
    """
    if isinstance(rows, Rows):
        return f"rows:{rows.fingerprint()}"
    fields = ("prompt", *COMPLETION_FIELDS[data_format])
    digest = hashlib.sha256()
    # ``default=str``: a message may carry extra keys of any type; they must not stop a run.
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str).encode
    # JSON escapes newlines inside strings, so one row per line cannot run into the next.
    batch: list[str] = []
    for row in rows:
        batch.append(encode([row.data.get(f) for f in fields]))
        if len(batch) >= 4096:
            digest.update(("\n".join(batch) + "\n").encode())
            batch.clear()
    digest.update(("\n".join(batch) + "\n").encode())
    return digest.hexdigest()


def cache_key(rows: Sequence[Row], data_format: str, tokenizer: Any, template: Any, max_length: int,
              max_prompt_length: int) -> str | None:
    """The entry key for these inputs, or ``None`` if the tokenizer or template cannot be fingerprinted."""
    tokenizer_part = tokenizer_fingerprint(tokenizer)
    template_part = template_fingerprint(template)
    if tokenizer_part is None or template_part is None:
        return None
    parts = {"format": FORMAT_VERSION, "code": code_fingerprint(), "data_format": data_format,
             "rows": rows_fingerprint(rows, data_format), "n": len(rows), "tokenizer": tokenizer_part,
             "template": template_part, "max_length": max_length, "max_prompt_length": max_prompt_length}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------------


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        digest.update(memoryview(a).cast("B"))  # the array's own bytes, not a copy of them
    return digest.hexdigest()


def to_arrays(data: TokenizedData) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata an entry stores for ``data``."""
    fields = ("prompt", *COMPLETION_FIELDS[data.data_format])
    examples = data.examples
    if isinstance(examples, CompactExamples):
        row_ids, ids = examples.row_ids, examples.ids
    else:  # a list of example dicts (built by hand)
        row_ids = np.asarray([e["row_id"] for e in examples], dtype=np.int64)
        ids = {f: flatten([e[f + "_ids"] for e in examples]) for f in fields}
    arrays: dict[str, np.ndarray] = {
        "row_id": row_ids, "full_lengths": np.asarray(data.full_lengths, dtype=np.int64),
        "dropped_row": np.asarray(data.dropped_ids, dtype=np.int64)}
    for f in fields:
        arrays[f + "_ids"], arrays[f + "_offsets"] = ids[f]
    reasons = sorted({why for _, why in data.dropped_rows})
    arrays["dropped_reason"] = np.asarray([reasons.index(why) for _, why in data.dropped_rows], dtype=np.int32)
    info = {"data_format": data.data_format, "truncated_rows": data.truncated_rows, "reasons": reasons}
    return arrays, info


def from_arrays(arrays: dict[str, np.ndarray], info: dict[str, Any], rows: Sequence[Row]) -> TokenizedData:
    """Rebuild the ``TokenizedData`` that ``to_arrays`` stored, reading the rest of each example from
    ``rows``; ``CorruptEntry`` if the arrays do not fit the rows."""
    data_format = info["data_format"]
    fields = ("prompt", *COMPLETION_FIELDS[data_format])
    row_ids = arrays["row_id"]
    n_rows = len(rows)
    if len(arrays["full_lengths"]) != n_rows or np.any((row_ids < 0) | (row_ids >= n_rows)):
        raise CorruptEntry("its rows do not match the data")
    ids = {}
    for f in fields:
        flat, offsets = arrays[f + "_ids"], arrays[f + "_offsets"]
        if (len(offsets) != len(row_ids) + 1 or offsets[0] != 0 or offsets[-1] != len(flat)
                or np.any(np.diff(offsets) < 0) or flat.dtype != np.int32):
            raise CorruptEntry(f"inconsistent {f} ids")
        ids[f] = (flat, offsets)
    reasons = info["reasons"]
    dropped_ids = arrays["dropped_row"].tolist()
    codes = arrays["dropped_reason"].tolist()
    if len(codes) != len(dropped_ids) or any(not 0 <= c < len(reasons) for c in codes) \
            or any(not 0 <= i < n_rows for i in dropped_ids):
        raise CorruptEntry("inconsistent dropped rows")
    data = TokenizedData(data_format, [], truncated_rows=int(info["truncated_rows"]),
                         full_lengths=arrays["full_lengths"].tolist())
    data.dropped_ids = dropped_ids
    data.dropped_rows = [(rows[i].location, reasons[c]) for i, c in zip(dropped_ids, codes, strict=True)]
    data.dropped = Counter(why for _, why in data.dropped_rows)
    data.examples = compact_from_arrays(fields, row_ids, ids, rows, data_format == UNPAIRED, prompt_for_judge)
    return data


# The dtypes an entry's arrays have (``to_arrays``), by their safetensors names.
_DTYPES = {"I32": np.dtype("<i4"), "I64": np.dtype("<i8")}


def read_entry(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """A safetensors entry's metadata and arrays, the arrays memory-mapped read-only rather than read
    into memory: a million rows' ids are paged in from the file (shared, reclaimable) instead of being
    copied, twice over, by ``safe_open``. Only int32/int64 arrays, which are all an entry holds, are
    read; anything else (or a header that does not fit the file) is a ``CorruptEntry``."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise CorruptEntry("truncated header")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise CorruptEntry("malformed header")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for name, spec in header.items():
        dtype = _DTYPES.get(spec["dtype"])
        begin, end = (int(x) for x in spec["data_offsets"])
        shape = tuple(int(x) for x in spec["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if dtype is None or not 0 <= begin <= end <= size - start or end - begin != count * dtype.itemsize:
            raise CorruptEntry(f"array {name!r} does not fit the file")
        arrays[name] = mapped[start + begin:start + end].view(dtype).reshape(shape)
    return metadata, arrays


class TokenCache:
    """The tokenized-data entries in one directory."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_token_cache_dir()

    def path(self, key: str) -> Path:
        """Where the entry ``key`` lives."""
        return self.directory / f"{key}{SUFFIX}"

    def load(self, key: str, rows: Sequence[Row]) -> TokenizedData | None:
        """The entry's data for ``rows``, ``None`` if absent; ``CorruptEntry`` if present but damaged."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            metadata, arrays = read_entry(path)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptEntry(f"unreadable ({type(exc).__name__}: {exc})") from None
        if metadata.get("key") != key or "checksum" not in metadata:
            raise CorruptEntry("missing key or checksum")
        if _checksum(arrays) != metadata["checksum"]:
            raise CorruptEntry("checksum mismatch")
        try:
            info = json.loads(metadata["info"])
            return from_arrays(arrays, info, rows)
        except CorruptEntry:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptEntry(f"malformed ({type(exc).__name__}: {exc})") from None

    def save(self, key: str, data: TokenizedData) -> Path:
        """Write an entry atomically (unique temp file + rename); ``OSError`` if it cannot be written."""
        from safetensors.numpy import save_file

        arrays, info = to_arrays(data)
        metadata = entry_metadata(key, FORMAT_VERSION, _checksum(arrays), info)
        return write_entry(self.directory, key, lambda path: save_file(arrays, path, metadata=metadata))


def resolve(cache: TokenCache | bool | None, n_rows: int) -> TokenCache | None:
    """The cache ``tokenize_rows`` uses: ``cache`` itself, the default one (``True``; ``None`` too, for
    at least ``MIN_ROWS`` rows and unless ``ALIGNER_TOKEN_CACHE`` turns it off), or none."""
    if isinstance(cache, TokenCache):
        return cache
    if cache is False or cache is None and (n_rows < MIN_ROWS or not cache_enabled()):
        return None
    return TokenCache()


def building(store: TokenCache, key: str) -> contextlib.AbstractContextManager[None]:
    """Hold the entry's lock (``aligner.data.cache_files.locked``: an exclusive ``flock`` on
    ``.<key>.lock``, removed after use) while it is built.

    The processes of a distributed run tokenize before any process group exists (the model and the
    accelerator come after): the first to take the lock tokenizes and writes the entry, the others
    wait on it and then read that entry, so the data is tokenized once per run (and once for runs
    sharing the cache). The lock goes with the process: one that dies releases it. Where no lock can
    be taken (an unwritable cache, a file system without locks) each process goes on alone.
    """
    return locked(store.directory, key)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is now (inode, size, modification time), ``None`` when there is none: an
    entry replaced by another process has a new identity."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _load_entry(store: TokenCache, key: str, rows: Sequence[Row]) -> TokenizedData | None:
    """The intact entry for ``rows``, or ``None`` (absent; damaged or unreadable, with a warning)."""
    try:
        return store.load(key, rows)
    except CorruptEntry as exc:
        log.warning("tokenized-data cache entry %s is corrupt (%s); tokenizing again and replacing it",
                    store.path(key), exc)
    except OSError as exc:
        log.warning("could not read tokenized-data cache entry %s (%s); tokenizing again", store.path(key), exc)
    return None


def cached_tokenize(rows: Sequence[Row], data_format: str, tokenizer: Any, template: Any, max_length: int,
                    max_prompt_length: int, store: TokenCache, build: Any) -> TokenizedData:
    """``build()``'s data, read from ``store`` when an intact entry for these inputs exists, else built
    and written there. A damaged entry is rebuilt with a warning; a cache that cannot be written only
    warns (the run goes on with the ids it just computed). Processes asking for the same entry at
    once build it once (``building``): the others wait and read it."""
    key = cache_key(rows, data_format, tokenizer, template, max_length, max_prompt_length)
    if key is None:
        return build()
    seen = _identity(store.path(key))
    hit = _load_entry(store, key, rows) if seen is not None else None
    if hit is None:
        with building(store, key):
            # Another process may have written it while this one waited for the lock: read it if the
            # file is new (a damaged entry, already warned about, is not read again unless replaced).
            now = _identity(store.path(key))
            if now is not None and now != seen:
                hit = _load_entry(store, key, rows)
            if hit is None:
                data = build()
                try:
                    store.save(key, data)
                except OSError as exc:
                    log.warning("could not write the tokenized-data cache in %s (%s); the next run tokenizes again",
                                store.directory, exc)
                return data
    log.info("tokenized %d rows: loaded from cache %s", len(rows), store.path(key))
    return hit
