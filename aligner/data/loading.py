"""Reading rows from local files and validating them before anything is trained.

JSON Lines files are parsed here line by line rather than by ``datasets`` so that every error can
name the exact line (``datasets`` reports a pyarrow schema error for the whole file). CSV, Parquet,
JSON arrays and ``save_to_disk`` folders go through ``datasets``; their rows are located by index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligner.data.formats import detect_format, validate_row
from aligner.errors import DataError, os_error

# What ``datasets``' ``save_to_disk`` leaves in a folder: a Dataset's state, or a DatasetDict's index.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


@dataclass
class Row:
    """One validated row and where it came from (for error messages)."""

    data: dict[str, Any]
    location: str


@dataclass
class RejectedRow:
    """A row that failed to parse or validate, with the located reason (``file, line N: why``)."""

    location: str
    message: str


def _reject(error: DataError, location: str, errors: list[RejectedRow] | None) -> None:
    """Collect ``error`` when collecting, else raise it (the training path stops at the first bad row)."""
    if errors is None:
        raise error
    errors.append(RejectedRow(location, str(error)))


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


def _read_jsonl(path: Path, errors: list[RejectedRow] | None = None) -> list[Row]:
    rows = []
    # Bytes, decoded line by line: a byte that is not UTF-8 is a located error of its own line (the
    # text decoder would raise for the whole file, with no line). bytes.splitlines ends lines where
    # text mode's universal newlines do (\n, \r\n and a lone \r), so line numbers are unchanged.
    try:
        content = path.read_bytes()
    except OSError as exc:  # permissions, an I/O error: one located line, like a bad row
        raise DataError(str(os_error(exc, path, "could not read"))) from exc
    for line_number, raw in enumerate(content.splitlines(), start=1):
        where = f"{path}, line {line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _reject(DataError(_not_utf8(where, raw, exc)), where, errors)
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r\n"))  # so an error's column is on this line
        except json.JSONDecodeError as exc:
            _reject(DataError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})"), where, errors)
            continue
        if not isinstance(value, dict):
            _reject(DataError(f"{where}: each line must be a JSON object, got {type(value).__name__}"),
                    where, errors)
            continue
        rows.append(Row(value, where))
    return rows


def _read_with_datasets(path: Path, split: str) -> list[Row]:
    import datasets

    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: no split '{split}'; splits: {', '.join(loaded)}")
                loaded = loaded[split]
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
            raise DataError(f"{path}: unsupported data file type '{suffix}'; use .jsonl, .json, .csv, .parquet "
                            "or a datasets save_to_disk folder")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise DataError(f"{path}: could not be read: {type(exc).__name__}: {exc}") from None
    return [Row(dict(r), f"{path}, {unit} {i + first_line}") for i, r in enumerate(loaded.to_list())]


def read_rows(path: str | Path, split: str = "train", errors: list[RejectedRow] | None = None) -> list[Row]:
    """All rows of a local data file or ``save_to_disk`` folder, each with its location.

    With an ``errors`` list, unparseable JSON Lines are collected there instead of raising.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir() and not any((path / name).is_file() for name in SAVED_DATASET_FILES):
        # datasets would say "neither a `Dataset` directory nor a `DatasetDict` directory".
        raise DataError(f"{path}: is a directory, not a data file (nor a folder written by datasets' save_to_disk)")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, errors)
    return _read_with_datasets(path, split)


def load_validated(path: str | Path, data_format: str | None, split: str = "train",
                   max_rows: int | None = None,
                   collect_errors: list[RejectedRow] | None = None) -> tuple[str, list[Row]]:
    """Read and validate every row; return the data format and the rows.

    By default the first invalid row stops everything with a ``DataError`` naming its file, line
    and field. With a ``collect_errors`` list (``aligner data check``), every bad row is appended
    there and left out, so one pass reports all of them. A file with no rows at all still raises.
    """
    rows = read_rows(path, split, collect_errors)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        unreadable = f" ({len(collect_errors)} unreadable lines)" if collect_errors else ""
        raise DataError(f"{path}: no rows{unreadable}")
    fmt = data_format
    valid = []
    for row in rows:
        try:
            # The format is guessed from the first row that is a usable object.
            fmt = fmt or detect_format(row.data, row.location)
            row.data = validate_row(row.data, fmt, row.location)
        except DataError as exc:
            _reject(exc, row.location, collect_errors)
            continue
        valid.append(row)
    if fmt is None:
        raise DataError(f"{path}: no row has a recognisable format")
    return fmt, valid
