"""Where rows come from: local files and folders, hub datasets, and mixtures of several sources.

A source is what ``data.train`` / ``data.eval`` name: a string (a local path, or a hub id
``org/name``), a mapping (``path`` plus ``split``, ``subset``, ``revision``, ``data_files``, ...;
``aligner.config.SourceConfig``) or a list of mappings (a mixture). This module only reads raw rows
and draws mixtures; column mapping, format conversion and validation are ``aligner.data.loading``'s.

JSON Lines files are parsed here line by line rather than by ``datasets`` so that every error can
name the exact line (``datasets`` reports a pyarrow schema error for the whole file). CSV, Parquet,
JSON arrays, ``save_to_disk`` folders, folders laid out like a hub dataset repo and hub ids go
through ``datasets``; their rows are located by index.

Rows are streamed, not held: a JSON Lines file is read a chunk at a time and a ``datasets`` table a
batch at a time (``RawRows``), so ``max_rows`` stops reading after the rows it uses, and the loader
keeps each validated row compactly (``aligner.data.rows``) as it goes.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aligner.data.rows import Row as Row  # re-exported: rows are imported from here
from aligner.data.rows import RowBlockBuilder, Rows, concat
from aligner.errors import DataError, os_error

# What ``datasets``' ``save_to_disk`` leaves in a folder: a Dataset's state, or a DatasetDict's index.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
# Suffixes that make a missing name a missing local file rather than a hub id.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv", ".yaml", ".yml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class RejectedRow:
    """A row that failed to parse or validate, with the located reason (``file, line N: why``)."""

    location: str
    message: str


def reject(error: DataError, location: str, errors: list[RejectedRow] | None) -> None:
    """Collect ``error`` when collecting, else raise it (the training path stops at the first bad row)."""
    if errors is None:
        raise error
    errors.append(RejectedRow(location, str(error)))


def looks_like_hub_id(value: str, bare_names: bool = True) -> bool:
    """Whether a name that is not a local path can be a hub dataset id (``org/name``; ``name`` too when
    ``bare_names``). Anything with a data-file suffix, a leading ``.``/``/``/``~`` or two slashes is a
    path, so a missing ``train.jsonl`` stays a "file not found" error."""
    if not _HUB_ID.match(value) or value.lower().endswith(DATA_FILE_SUFFIXES):
        return False
    return bare_names or "/" in value


def key_text(source: Any, *sub: str) -> str:
    """``'stages[0].data.train[1].columns.prompt' (file, line N)`` for a configured source, or the
    source's own text when it was not read from a config (a plain path handed to the loader)."""
    describe = getattr(source, "key_text", None)
    return describe(*sub) if describe is not None else f"'{source}'"


def _not_utf8(where: str, raw: bytes, exc: UnicodeDecodeError, line_start: int = 0) -> str:
    """``WHERE: not UTF-8 (byte 0x.. at column N)``; ``raw``'s line with the bad byte starts at ``line_start``."""
    return (f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start - line_start + 1}); "
            "save the file as UTF-8")


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file, or one located error line.

    A byte that is not UTF-8 is a ``DataError`` naming the file, line and column; a file that cannot
    be read (missing, a directory, no permission, an I/O error) is a ``PathError`` naming it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise os_error(exc, path, "could not read") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_number = raw.count(b"\n", 0, exc.start) + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        raise DataError(_not_utf8(f"{path}, line {line_number}", raw, exc, line_start)) from None


# Bytes read per chunk of a JSON Lines file: the file is streamed, never held whole.
READ_CHUNK = 1 << 20


def _lines(handle: Any) -> Iterator[bytes]:
    """The lines of a binary file, split where ``bytes.splitlines`` splits them (\\n, \\r\\n and a
    lone \\r, as text mode's universal newlines do), read a chunk at a time."""
    carry = b""
    while chunk := handle.read(READ_CHUNK):
        lines = (carry + chunk).splitlines(keepends=True)
        # The last piece may continue in the next chunk (no end yet, or a \\r whose \\n follows).
        carry = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        for line in lines:
            yield line.rstrip(b"\r\n")
    if carry:
        yield carry.rstrip(b"\r\n")


def _iter_jsonl(path: Path, errors: list[RejectedRow] | None = None,
                max_rows: int | None = None) -> Iterator[tuple[dict[str, Any], int]]:
    """Each JSON object of a JSON Lines file with its line number; reading stops after ``max_rows``
    objects, so the rest of the file is neither read nor parsed."""
    # Bytes, decoded line by line: a byte that is not UTF-8 is a located error of its own line (the
    # text decoder would raise for the whole file, with no line). Lines end where text mode's
    # universal newlines end them (\\n, \\r\\n and a lone \\r), so line numbers are unchanged.
    try:
        handle = path.open("rb")
    except OSError as exc:  # permissions, an I/O error: one located line, like a bad row
        raise DataError(str(os_error(exc, path, "could not read"))) from exc
    found = 0
    with handle:
        try:
            lines = enumerate(_lines(handle), start=1)
            for line_number, raw in lines:
                if max_rows is not None and found >= max_rows:
                    return
                value = _parse_line(path, line_number, raw, errors)
                if value is not None:
                    found += 1
                    yield value, line_number
        except OSError as exc:
            raise DataError(str(os_error(exc, path, "could not read"))) from exc


def _parse_line(path: Path, line_number: int, raw: bytes, errors: list[RejectedRow] | None) -> dict[str, Any] | None:
    """One line's JSON object, or ``None`` for a blank line or (when collecting) a rejected one."""
    if not raw.strip():
        return None
    where = f"{path}, line {line_number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reject(DataError(_not_utf8(where, raw, exc)), where, errors)
        return None
    if not line.strip():
        return None
    try:
        value = json.loads(line)  # the line alone, so an error's column is on this line
    except json.JSONDecodeError as exc:
        reject(DataError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})"), where, errors)
        return None
    if not isinstance(value, dict):
        reject(DataError(f"{where}: each line must be a JSON object, got {type(value).__name__}"), where, errors)
        return None
    return value


@dataclass
class RawRows:
    """A source's raw rows as they are read: each row's dict and its position (the N of ``unit N``
    in ``"<label>, <unit> N"``, the row's location), streamed rather than held."""

    label: str
    unit: str
    rows: Iterator[tuple[dict[str, Any], int]]

    def collect(self) -> Rows:
        """Every row, held compactly (``aligner.data.rows``)."""
        builder = RowBlockBuilder(self.label, self.unit)
        for data, position in self.rows:
            builder.append(data, position)
        return Rows.of(builder.build())


# Rows taken from a ``datasets.Dataset`` at a time: its Arrow table is never turned into Python whole.
DATASET_BATCH = 1000


def _located(loaded: Any, label: str, unit: str = "row", first: int = 0, max_rows: int | None = None) -> RawRows:
    """A ``datasets.Dataset``'s rows, located; only the first ``max_rows`` are read."""
    if max_rows is not None and len(loaded) > max_rows:
        loaded = loaded.select(range(max_rows))
    # Plain Python values whatever format the dataset was given (numpy, torch, pandas), as
    # ``to_list`` would give them: the row checks expect strings and lists, not arrays.
    loaded = loaded.with_format(None)

    def rows() -> Iterator[tuple[dict[str, Any], int]]:
        at = first
        for batch in loaded.iter(batch_size=DATASET_BATCH):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                yield dict(zip(columns, values, strict=True)), at
                at += 1

    return RawRows(label, unit, rows())


def _pick_split(loaded: Any, split: str, label: str, key: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{label}: no split '{split}'{key}; splits: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _read_with_datasets(path: Path, split: str, max_rows: int | None = None) -> RawRows:
    import datasets

    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            loaded = _pick_split(datasets.load_from_disk(str(path)), split, str(path), "")
            first_line, unit = 0, "row"
        elif suffix == ".csv":
            loaded = datasets.load_dataset("csv", data_files=str(path), split="train")
            first_line, unit = 2, "line"  # line 1 is the header
        elif suffix == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
            first_line, unit = 0, "row"
        elif suffix == ".json":
            loaded = datasets.load_dataset("json", data_files=str(path), split="train")
            first_line, unit = 0, "item"
        else:
            raise DataError(f"{path}: unsupported data file type '{suffix}'; use .jsonl, .json, .csv, .parquet, "
                            "a datasets save_to_disk folder, a folder of data files or a hub dataset id")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise DataError(f"{path}: could not be read: {type(exc).__name__}: {exc}") from None
    return _located(loaded, str(path), unit, first_line, max_rows)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES)


def read_rows(path: str | Path, split: str = "train", errors: list[RejectedRow] | None = None,
              max_rows: int | None = None) -> Rows:
    """The raw rows of a local data file or ``save_to_disk`` folder, each with its location (see ``read_raw``)."""
    return read_raw(path, split, errors, max_rows).collect()


def read_raw(path: str | Path, split: str = "train", errors: list[RejectedRow] | None = None,
             max_rows: int | None = None) -> RawRows:
    """The rows of a local data file or ``save_to_disk`` folder, streamed with their positions.

    With an ``errors`` list, unparseable JSON Lines are collected there instead of raising.
    ``max_rows`` stops reading after that many rows: the rest of the file is not read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir() and not is_saved_dataset(path):
        # datasets would say "neither a `Dataset` directory nor a `DatasetDict` directory".
        raise DataError(f"{path}: is a directory, not a data file (nor a folder written by datasets' save_to_disk)")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return RawRows(str(path), "line", _iter_jsonl(path, errors, max_rows))
    return _read_with_datasets(path, split, max_rows)


def read_in_memory(source: Any, split: str, max_rows: int | None = None) -> RawRows:
    """Rows of an in-memory ``datasets.Dataset`` (or the ``split`` of a ``DatasetDict``) handed to the
    Python API, located as ``<label>, row N``."""
    dataset = source.dataset
    label = source.path
    if hasattr(dataset, "keys"):  # a DatasetDict
        if split not in dataset:
            raise DataError(f"{key_text(source, 'split')}: the in-memory DatasetDict has no split '{split}'; "
                            f"splits: {', '.join(dataset)}")
        dataset, label = dataset[split], f"<in-memory dataset[{split}]>"
    else:
        label = "<in-memory dataset>"
    return _located(dataset, label, max_rows=max_rows)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0")


def load_dataset_source(source: Any, split: str, max_rows: int | None = None) -> RawRows:
    """Rows of a folder laid out like a hub dataset repo (data files, optionally a README with configs)
    or of a hub dataset id, read by ``datasets.load_dataset`` with the source's ``split``, ``subset``,
    ``revision`` and ``data_files``; the rows are located by the source's label."""
    import datasets

    path = source.path
    split = source.split or split
    label = f"{path}[{split}]" if not source.subset else f"{path}[{source.subset}/{split}]"
    local = Path(path).is_dir()
    kwargs: dict[str, Any] = {"split": split}
    if source.subset:
        kwargs["name"] = source.subset
    if source.revision and not local:
        kwargs["revision"] = source.revision
    if source.data_files is not None:
        kwargs["data_files"] = source.data_files
    if source.streaming:
        kwargs["streaming"] = True
    try:
        loaded = datasets.load_dataset(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets and the hub client raise many types
        raise DataError(_load_failure(source, path, split, local, exc)) from None
    if source.streaming:
        return _located_stream(loaded, label, source, max_rows)
    return _located(loaded, label, max_rows=max_rows)


def _located_stream(loaded: Any, label: str, source: Any, max_rows: int | None) -> RawRows:
    """A streamed ``datasets.IterableDataset``'s rows, located like a loaded one's (``label, row N``);
    only the first ``max_rows`` are fetched. A failure while streaming names the source's key."""
    if max_rows is not None:
        loaded = loaded.take(max_rows)
    loaded = loaded.with_format(None)  # plain Python values, as for a loaded dataset

    def rows() -> Iterator[tuple[dict[str, Any], int]]:
        at = 0
        iterator = iter(loaded)
        while True:
            try:
                row = next(iterator)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a network or file error mid-stream
                raise DataError(f"{key_text(source)}: streaming {label} failed at row {at}: "
                                f"{type(exc).__name__}: {exc}") from None
            yield dict(row), at
            at += 1

    return RawRows(label, "row", rows())


def _load_failure(source: Any, path: str, split: str, local: bool, exc: Exception) -> str:
    """One line saying why ``datasets.load_dataset`` failed, naming the config key to change."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    if "Unknown split" in text or "Bad split" in text:
        return f"{key_text(source, 'split')}: {path} has no split '{split}' ({str(exc).strip()})"
    if source.subset and ("BuilderConfig" in text or "config name" in text.lower()):
        return f"{key_text(source, 'subset')}: {path} has no subset '{source.subset}' ({text})"
    if not local and _hub_offline():
        return (f"{key_text(source)}: hub dataset '{path}' is not in the local cache and the hub is offline "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): download it once with network access, or point "
                f"'path' at a local copy (a file, a save_to_disk folder or a dataset repo folder) ({text})")
    where = "local dataset folder" if local else "hub dataset"
    return f"{key_text(source)}: {where} '{path}' could not be loaded: {text}"


# ---------------------------------------------------------------------------------------------
# Mixtures
# ---------------------------------------------------------------------------------------------


def mixture_counts(sizes: list[int], weights: list[float] | None = None,
                   fractions: list[float] | None = None) -> list[int]:
    """How many rows each source contributes to a mixture.

    - ``fractions``: ``round(fraction * rows)`` of each source (above 1, whole copies plus a sample).
    - ``weights``: each source's share of the mixture is ``weight / sum(weights)``; the mixture is the
      largest one in which no source repeats a row, so the source that runs out first at its share
      is used whole and the others are sampled down to their shares.
    - neither: every row of every source.
    """
    if fractions is not None:
        return [round(f * n) for f, n in zip(fractions, sizes, strict=True)]
    if weights is None:
        return list(sizes)
    total = sum(weights)
    shares = [w / total for w in weights]
    size = min(n / s for n, s in zip(sizes, shares, strict=True))
    return [min(n, round(s * size)) for n, s in zip(sizes, shares, strict=True)]


def draw(size: int, count: int, rng: random.Random) -> list[int]:
    """Positions of ``count`` of ``size`` rows drawn without repeats (whole copies first when ``count``
    exceeds them)."""
    copies, rest = divmod(count, size) if size else (0, 0)
    picked = list(range(size)) * copies
    picked += sorted(rng.sample(range(size), rest))
    return picked


def mix(parts: list[Rows], counts: list[int], seed: int) -> Rows:
    """Draw ``counts[i]`` rows of ``parts[i]`` and shuffle them together; the same seed gives the same
    mixture (each source draws from its own generator, so one source's size does not change another's
    sample). Only index arrays are built: the rows stay in their sources' blocks."""
    drawn = [part.select(np.asarray(draw(len(part), count, random.Random(f"{seed}:source:{index}")), dtype=np.int64))
             for index, (part, count) in enumerate(zip(parts, counts, strict=True))]
    mixed = concat(drawn)
    order = list(range(len(mixed)))
    random.Random(f"{seed}:mixture").shuffle(order)  # the same swaps as shuffling the rows themselves
    return mixed.select(order)


@dataclass
class FolderSource:
    """A dataset repo folder named by a plain string (``data.train: data/my_dataset``): read like a
    configured source with nothing but its path."""

    path: str
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    data_files: Any = None
    streaming: bool = False

    def __str__(self) -> str:
        return self.path


def is_repo_folder(path: Path) -> bool:
    """A folder to read with ``datasets.load_dataset``: not a ``save_to_disk`` folder, and not named
    like a data file (a folder called ``train.jsonl`` is a mistake to report, not a dataset)."""
    return path.is_dir() and not is_saved_dataset(path) and not path.name.lower().endswith(DATA_FILE_SUFFIXES)


def source_label(source: Any) -> str:
    """A short text for a configured source in reports: its path or hub id, or a mixture's members."""
    if isinstance(source, list | tuple):
        return f"mixture of {len(source)} sources: " + " + ".join(source_label(s) for s in source)
    return str(source)
