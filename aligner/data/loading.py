"""From a configured source to validated rows: read, map columns, convert the layout, validate, mix.

``load_validated`` is the one entry point. For each source (``aligner.data.sources``) it reads the
raw rows, renames columns by the source's ``columns:`` mapping, rewrites rows of a known layout
(``aligner.data.converters``: Alpaca, ShareGPT, ...) and validates them against aligner's row formats
(``aligner.data.formats``). Several sources are then drawn into one mixture. Every error names the
config key it comes from and the source and line/row of the row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aligner.data.converters import CONVERTERS, ROW_FORMATS, detect_converter
from aligner.data.formats import detect_format, validate_row
from aligner.data.rows import RowBlockBuilder, Rows
from aligner.data.sources import (
    SAVED_DATASET_FILES,
    FolderSource,
    RawRows,
    RejectedRow,
    Row,
    is_repo_folder,
    is_saved_dataset,
    key_text,
    load_dataset_source,
    looks_like_hub_id,
    mix,
    mixture_counts,
    read_in_memory,
    read_raw,
    read_rows,
    read_text,
    reject,
)
from aligner.errors import DataError

if TYPE_CHECKING:
    from aligner.data.rows_cache import Loaded

__all__ = ["SAVED_DATASET_FILES", "RejectedRow", "Row", "SourceReport", "load_validated", "read_rows", "read_text"]


@dataclass
class SourceReport:
    """What one source contributed: for ``aligner data check``."""

    label: str
    layout: str  # the converter, or "native" for rows already in aligner's format
    data_format: str | None
    rows_read: int = 0
    valid: int = 0
    used: int = 0
    rejected: int = 0
    weight: float | None = None
    fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """``label: layout -> format, N rows read, M valid, K used``."""
        share = (f", weight {self.weight:g}" if self.weight is not None else
                 f", fraction {self.fraction:g}" if self.fraction is not None else "")
        layout = self.layout if self.layout != "native" else "aligner's own fields"
        return (f"{self.label}: {layout} -> {self.data_format or '?'} rows{share}; {self.rows_read} read, "
                f"{self.rejected} rejected, {self.valid} valid, {self.used} used")


def _read_source(source: Any, split: str, errors: list[RejectedRow] | None,
                 max_rows: int | None) -> tuple[str, RawRows]:
    """The raw rows of one source (a path, or a configured source), streamed, and its label for reports."""
    if isinstance(source, str | Path):
        if is_repo_folder(Path(source)):
            raw = load_dataset_source(FolderSource(str(source)), split, max_rows)
            return raw.label, raw
        return str(source), read_raw(source, split, errors, max_rows)
    split = source.split or split
    if getattr(source, "dataset", None) is not None:
        if source.streaming:
            raise DataError(f"{key_text(source, 'streaming')}: an in-memory dataset is already loaded; "
                            "streaming applies to hub ids and dataset repo folders")
        raw = read_in_memory(source, split, max_rows)
        return raw.label, raw
    path = Path(source.path)
    single = path.exists() and (path.is_file() or is_saved_dataset(path)) and source.data_files is None
    if source.streaming and single:
        raise DataError(f"{key_text(source, 'streaming')}: streaming applies to hub ids and dataset repo folders; "
                        f"{source} is read a row at a time already (max_rows reads only what it uses)")
    if single:
        if source.subset:
            raise DataError(f"{key_text(source, 'subset')}: {path} is a single dataset; 'subset' only applies "
                            "to dataset repo folders and hub ids")
        return str(path), read_raw(path, split, errors, max_rows)
    if path.exists() or looks_like_hub_id(source.path):
        raw = load_dataset_source(source, split, max_rows)
        return raw.label, raw
    raise DataError(f"{key_text(source)}: data file not found: {path}")


def map_columns(row: dict[str, Any], columns: dict[str, str], source: Any, location: str) -> dict[str, Any]:
    """``row`` with each ``columns`` entry ``{aligner_name: source_column}`` applied: the source column's
    value moves to the aligner name (the source column is dropped unless another entry reads it)."""
    mapped = dict(row)
    read = set(columns.values())
    for target, column in columns.items():
        if column not in row:
            raise DataError(f"{location}: no column '{column}' (mapped to '{target}' by "
                            f"{key_text(source, 'columns', target)}); columns: {', '.join(sorted(row))}")
        mapped[target] = row[column]
    for column in read - set(columns):
        mapped.pop(column, None)
    return mapped


def _check_mapping(first: dict[str, Any], columns: dict[str, str], source: Any, label: str) -> None:
    """A mapping that names a column the source does not have is a config error, reported once (with
    the key to fix) rather than once per row."""
    for target, column in columns.items():
        if column not in first:
            raise DataError(f"{key_text(source, 'columns', target)}: {label} has no column '{column}'"
                            f"; its columns: {', '.join(sorted(first))}")


def _declared_layout(source: Any, data_format: str | None) -> tuple[str | None, str | None]:
    """The converter and row format a source's ``format`` key names (``None`` where it leaves them to
    detection); a converter whose rows are not the split's format is an error of that key."""
    declared = getattr(source, "format", None)
    if declared in CONVERTERS:
        produced = CONVERTERS[declared].data_format
        # A prompt-only stage takes the prompts of any layout; otherwise the formats must agree.
        if data_format not in (None, produced, "prompt"):
            raise DataError(f"{key_text(source, 'format')}: {declared} rows are {produced} rows, but this data "
                            f"is read as {data_format} rows")
        return declared, data_format or produced
    if declared in ROW_FORMATS:
        if data_format not in (None, declared):
            raise DataError(f"{key_text(source, 'format')}: {declared} rows, but this data is read as "
                            f"{data_format} rows")
        return None, declared
    return None, data_format


def _detected_layout(row: dict[str, Any], data_format: str | None, location: str) -> tuple[str | None, str]:
    """The converter and row format the first row's fields call for. A detected layout whose rows are
    not the requested format is not used: the rows are then validated as that format, as written."""
    converter = detect_converter(row)
    if converter is not None and data_format in (None, CONVERTERS[converter].data_format, "prompt"):
        return converter, data_format or CONVERTERS[converter].data_format
    return None, data_format or detect_format(row, location)


def _load_one(source: Any, data_format: str | None, split: str, max_rows: int | None,
              errors: list[RejectedRow] | None, report: SourceReport | None) -> tuple[str, Rows]:
    """Read, map, convert and validate the rows of one source, or map them from the validated-rows
    cache (``aligner.data.rows_cache``) when an earlier load of the same file with the same options
    wrote them: the rows, their locations, the report and every rejected row are the same either way."""
    from aligner.data import rows_cache

    path = rows_cache.cached_file(source)
    store = rows_cache.resolve() if path is not None else None

    def build() -> rows_cache.Loaded:
        return _read_and_validate(source, data_format, split, max_rows, errors, report)

    if store is None or path is None:
        loaded = build()
    else:
        loaded, hit = rows_cache.cached_load(store, path, source, data_format, max_rows, errors is not None, build)
        if hit:  # nothing was read: the report and the rejected rows are the entry's
            if errors is not None:
                errors.extend(RejectedRow(location, message) for location, message in loaded.rejected)
            if report is not None:
                _fill_report(report, loaded)
    return loaded.data_format, Rows.of(loaded.block)


def _fill_report(report: SourceReport, loaded: Loaded) -> None:
    """What ``_read_and_validate`` tells the report, from a cached load."""
    report.label, report.layout, report.data_format = loaded.label, loaded.layout, loaded.data_format
    report.rows_read, report.valid, report.rejected = loaded.rows_read, len(loaded.block), len(loaded.rejected)
    report.used = len(loaded.block)


def _read_and_validate(source: Any, data_format: str | None, split: str, max_rows: int | None,
                       errors: list[RejectedRow] | None, report: SourceReport | None) -> Loaded:
    """Read, map, convert and validate the rows of one source, streaming: each raw row is validated
    as it is read and kept compactly (``aligner.data.rows``); reading stops after ``max_rows``."""
    from aligner.data.rows_cache import Loaded

    collected: list[RejectedRow] | None = [] if errors is not None else None
    label, raw = _read_source(source, split, collected, max_rows)
    if report is not None:
        report.label = label
    stream = iter(raw.rows)
    first = next(stream, None)
    if first is None:
        unreadable = f" ({len(collected)} unreadable lines)" if collected else ""
        if collected and errors is not None:
            errors.extend(collected)
        raise DataError(f"{label}: no rows{unreadable}")
    columns = dict(getattr(source, "columns", None) or {})
    if columns:
        _check_mapping(first[0], columns, source, label)
    converter, fmt = _declared_layout(source, data_format)
    decided = converter is not None or fmt is not None and getattr(source, "format", None) is not None
    kept = RowBlockBuilder(raw.label, raw.unit)
    read = 0
    for data, position in itertools.chain((first,), stream):
        read += 1
        location = f"{raw.label}, {raw.unit} {position}"
        try:
            if columns:
                data = map_columns(data, columns, source, location)
            # The layout is decided by the first row that is a usable object.
            if not decided:
                converter, fmt = _detected_layout(data, fmt, location)
                decided = True
            if converter is not None:
                data = CONVERTERS[converter].convert(data, location)
            data = validate_row(data, fmt, location)  # type: ignore[arg-type]
        except DataError as exc:
            reject(exc, location, collected)
            continue
        kept.append(data, position)
    if errors is not None and collected is not None:
        errors.extend(collected)
    if report is not None:
        report.layout, report.data_format = converter or "native", fmt
        report.rows_read, report.valid, report.rejected = read, len(kept), len(collected or [])
        report.used = len(kept)
    if fmt is None:
        raise DataError(f"{label}: no row has a recognisable format")
    return Loaded(kept.build(), fmt, label, converter or "native", read,
                  [(r.location, r.message) for r in collected or []])


def load_validated(source: Any, data_format: str | None, split: str = "train",
                   max_rows: int | None = None, collect_errors: list[RejectedRow] | None = None,
                   seed: int | None = None, sources: list[SourceReport] | None = None) -> tuple[str, Rows]:
    """Read and validate every row of ``source``; return the data format and the rows.

    ``source`` is a path (str or Path), a configured source (``aligner.config.SourceConfig``) or a
    list of them (a mixture, drawn with ``seed``; by default the run's seed the config stored on its
    sources). By default the first invalid row stops everything with a ``DataError`` naming its
    source, line and field. With a ``collect_errors`` list (``aligner data check``), every bad row is
    appended there and left out, so one pass reports all of them. A source with no rows at all still
    raises. ``sources``, when given, receives one ``SourceReport`` per source.

    The rows come back as ``aligner.data.rows.Rows``: a read-only sequence of ``Row`` (data and
    location) held as one compact buffer per source, not a list of Python objects.
    """
    entries = list(source) if isinstance(source, list | tuple) else [source]
    if not entries:
        raise DataError("no data sources given")
    mixture = len(entries) > 1 or getattr(entries[0], "fraction", None) is not None
    fmt = data_format
    parts = []
    for entry in entries:
        report = SourceReport(str(entry), "native", None, weight=getattr(entry, "weight", None),
                              fraction=getattr(entry, "fraction", None))
        if sources is not None:
            sources.append(report)
        # A mixture's max_rows applies to the mixture, not to each source.
        # Each source is read as the requested format (or its own, detected): a mismatch between
        # sources is then reported as such, rather than as a missing field of the later source.
        entry_fmt, rows = _load_one(entry, data_format, split, None if mixture else max_rows, collect_errors, report)
        if fmt is not None and entry_fmt != fmt:
            layout = f" ({report.layout} layout)" if report.layout != "native" else ""
            raise DataError(f"{key_text(entry)}: holds {entry_fmt} rows{layout}, but the sources before it hold "
                            f"{fmt} rows; every source of a split must give rows of one format")
        fmt = entry_fmt
        parts.append(rows)
    if not mixture:
        return fmt, parts[0]  # type: ignore[return-value]
    weights = [getattr(e, "weight", None) for e in entries]
    fractions = [getattr(e, "fraction", None) for e in entries]
    counts = mixture_counts([len(p) for p in parts],
                            weights=[w if w is not None else 1.0 for w in weights] if any(w is not None for w in weights) else None,
                            fractions=[f if f is not None else 1.0 for f in fractions] if any(f is not None for f in fractions) else None)
    if sources is not None:
        for report, count in zip(sources[-len(entries):], counts, strict=True):
            report.used = count
    if seed is None:
        seed = getattr(entries[0], "mixture_seed", 0)
    rows = mix(parts, counts, seed)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{key_text(entries[0])}: the mixture has no rows")
    return fmt, rows  # type: ignore[return-value]
