"""``aligner data check``: what a config's data would look like to training, without training.

For every stage and split it reports the rows read, the rows rejected and why (file and line), the
token-length distribution, what truncation would do, the rows training would drop (empty
completions, identical chosen/rejected pairs, rows truncation empties), duplicates, and eval rows
that also occur in train. Nothing here loads a model: only the tokenizer. For the first rows of
each source (``--show-tokens N``, 2 by default) it shows the tokens as training sees them, which are
prompt (context only) and which are trained on (``token_views``).

Training uses the same report: when a split would lose more than ``data.max_drop_fraction`` of its
rows, the run stops before the model is loaded and logs this report (``enforce_drop_limit``).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.config import DataConfig, RunConfig, load_config
from aligner.data.loading import RejectedRow, Row, SourceReport
from aligner.data.sources import source_label
from aligner.data.tokenize import COMPLETION_FIELDS, TokenizedData, prompt_token_limit, tokenize_rows
from aligner.errors import DataError
from aligner.protocols import PREFERENCE
from aligner.training.stages import Problems, is_chat, prepare_stage_collecting, stage_template

log = logging.getLogger("aligner")

SHOW_TOKENS = 2  # rows per source whose tokens the report shows, unless --show-tokens says otherwise
TRUNCATION_REASONS = ("no completion tokens left after truncation", "chosen and rejected identical after truncation")
SHOWN = 20  # located rows listed per kind before "... and N more"


@dataclass
class TokenView:
    """One tokenized sequence of a row: each token's text and whether the loss trains on it."""

    location: str
    source: str
    # The completion field the sequence ends with ("completion", "chosen", "rejected"); None for a
    # prompt-only row, whose completions are generated during training.
    completion: str | None
    tokens: list[tuple[int, str, bool]] = field(default_factory=list)  # (id, decoded text, trained)
    dropped: str | None = None  # why training drops the row (then there are no tokens)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: exact token strings, each with its ``trained`` flag."""
        return {"location": self.location, "source": self.source, "completion": self.completion,
                "dropped": self.dropped,
                "tokens": [{"id": i, "text": text, "trained": trained} for i, text, trained in self.tokens]}

    def render(self) -> str:
        """``location field: [prompt|tokens]trained|tokens``: prompt tokens bracketed, ``|`` between tokens.

        Nothing is put between ``]`` and the first trained token, so a space that token starts with
        (a prompt's separating space merged into the completion's first word) stays visible."""
        what = self.completion or "prompt"
        if self.dropped is not None:
            return f"{self.location} ({what}): dropped, {self.dropped}"
        prompt = "|".join(_visible(text) for _, text, trained in self.tokens if not trained)
        trained = "|".join(_visible(text) for _, text, trained in self.tokens if trained)
        note = "" if self.completion else "  (prompt only: completions are generated in training)"
        return f"{self.location} {what}: [{prompt}]{trained}" + note


def _visible(text: str) -> str:
    # Line breaks and tabs inside a token would break the one-line-per-sequence layout.
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _source_of(location: str) -> str:
    """The source part of a row location (``file, line 3`` -> ``file``)."""
    return location.rsplit(", ", 1)[0]


def token_views(rows: list[Row], tokenized: TokenizedData, tokenizer: Any, per_source: int) -> list[TokenView]:
    """The sequences of the first ``per_source`` rows of each source, as training tokenized them.

    Preference rows give two views (chosen, rejected), sft/unpaired rows one, prompt-only rows one
    with no trained token. The ids are the tokenized examples' own, so what is shown is what trains.
    """
    if per_source <= 0:
        return []
    fields = COMPLETION_FIELDS[tokenized.data_format]
    examples = {e["row_id"]: e for e in tokenized.examples}
    dropped = dict(tokenized.dropped_rows)
    shown: Counter = Counter()
    views: list[TokenView] = []
    for row_id, row in enumerate(rows):
        source = _source_of(row.location)
        if shown[source] >= per_source:
            continue
        shown[source] += 1
        example = examples.get(row_id)
        for name in fields or (None,):
            view = TokenView(row.location, source, name)
            if example is None:
                view.dropped = dropped.get(row.location, "not tokenized")
            else:
                completion = example[f"{name}_ids"] if name else []
                view.tokens = ([(i, tokenizer.decode([i]), False) for i in example["prompt_ids"]]
                               + [(i, tokenizer.decode([i]), True) for i in completion])
            views.append(view)
    return views


@dataclass
class SplitReport:
    """What one split of one stage holds and what training would do with it."""

    stage: str
    split: str
    source: str
    data_format: str | None = None
    max_length: int = 0
    max_prompt_length: int = 0
    max_drop_fraction: float = 1.0
    rejected: list[RejectedRow] = field(default_factory=list)
    valid: int = 0
    kept: int | None = None
    dropped: Counter = field(default_factory=Counter)
    dropped_rows: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0
    lengths: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    identical_pairs: int = 0
    in_train: int = 0
    problems: list[str] = field(default_factory=list)
    # The format training runs the rows as, when not the file's own (sft for a stage of chosen-only losses).
    trained_as: str | None = None
    # Each source of the split: its layout (converter) and how many of its rows were read, valid and used.
    sources: list[SourceReport] = field(default_factory=list)
    # The first rows of each source as tokens, prompt and trained marked (``token_views``).
    token_views: list[TokenView] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        """Rows in the source, valid or not."""
        return self.valid + len(self.rejected)

    @property
    def dropped_total(self) -> int:
        """Valid rows tokenization would drop."""
        return sum(self.dropped.values())

    @property
    def drop_fraction(self) -> float:
        """Share of the valid rows training would drop."""
        return self.dropped_total / self.valid if self.valid else 0.0

    @property
    def truncation_touches(self) -> int:
        """Rows whose prompt or completion truncation cuts, whether they survive or not."""
        return self.truncated + sum(self.dropped[r] for r in TRUNCATION_REASONS)

    @property
    def truncation_empties(self) -> int:
        """Rows truncation leaves without a completion token."""
        return self.dropped[TRUNCATION_REASONS[0]]

    @property
    def failed(self) -> bool:
        """Whether this split would stop a run (or fails the check)."""
        return bool(self.rejected or self.problems) or self.drop_fraction > self.max_drop_fraction

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``aligner data check --json``)."""
        return {
            "stage": self.stage, "split": self.split, "source": self.source, "format": self.data_format,
            "rows": self.rows_read, "rejected": [{"location": r.location, "message": r.message} for r in self.rejected],
            "kept": self.kept, "dropped": dict(self.dropped),
            "dropped_rows": [{"location": loc, "reason": why} for loc, why in self.dropped_rows],
            "drop_fraction": self.drop_fraction, "max_drop_fraction": self.max_drop_fraction,
            "truncation": {"touches": self.truncation_touches, "empties": self.truncation_empties,
                           "max_length": self.max_length, "max_prompt_length": self.max_prompt_length},
            "token_lengths": self.lengths, "duplicates": self.duplicates, "identical_pairs": self.identical_pairs,
            "eval_rows_in_train": self.in_train, "problems": self.problems, "failed": self.failed,
            "trained_as": self.trained_as,
            "sources": [{"source": s.label, "layout": s.layout, "format": s.data_format, "rows": s.rows_read,
                         "rejected": s.rejected, "valid": s.valid, "used": s.used, "weight": s.weight,
                         "fraction": s.fraction} for s in self.sources],
            "token_views": [v.to_dict() for v in self.token_views],
        }


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min / median / p95 / max of token counts (nearest-rank p95); empty for no rows."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def _position(location: str) -> int:
    """The line/row/item number at the end of a location, for sorting."""
    last = location.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


def _row_key(row: Row) -> str:
    return json.dumps(row.data, sort_keys=True, ensure_ascii=False)


def split_report(stage: str, split: str, source: str, data: DataConfig, data_format: str | None, rows: list[Row],
                 rejected: list[RejectedRow], tokenized: TokenizedData | None,
                 train_keys: set[str] | None = None, trained_as: str | None = None) -> SplitReport:
    """Summarise one split from its valid rows, rejected rows and (if the template loaded) tokenization.

    ``trained_as`` is the format training runs ``rows`` as when not ``data_format`` (the file's); the
    rows are then already in that format."""
    # Unparseable lines are found while reading, invalid rows afterwards: list them in file order.
    ordered = sorted(rejected, key=lambda r: _position(r.location))
    report = SplitReport(stage, split, source, data_format, data.max_length, data.max_prompt_length,
                         data.max_drop_fraction, rejected=ordered, valid=len(rows), trained_as=trained_as)
    counts = Counter(_row_key(r) for r in rows)
    report.duplicates = sum(n - 1 for n in counts.values())
    if (trained_as or data_format) == PREFERENCE:
        report.identical_pairs = sum(r.data["chosen"] == r.data["rejected"] for r in rows)
    if train_keys is not None:
        report.in_train = sum(_row_key(r) in train_keys for r in rows)
    if tokenized is not None:
        report.kept = len(tokenized.examples)
        report.dropped = Counter(tokenized.dropped)
        report.dropped_rows = list(tokenized.dropped_rows)
        report.truncated = tokenized.truncated_rows
        report.lengths = length_stats(tokenized.full_lengths)
    return report


def _listed(items: list[str]) -> list[str]:
    shown = [f"    {item}" for item in items[:SHOWN]]
    if len(items) > SHOWN:
        shown.append(f"    ... and {len(items) - SHOWN} more")
    return shown


def format_report(report: SplitReport) -> str:
    """The human-readable report of one split."""
    kept = "?" if report.kept is None else report.kept
    trained = f", run as {report.trained_as} rows (chosen completions only)" if report.trained_as else ""
    lines = [f"stage '{report.stage}' {report.split} ({report.source}, {report.data_format or 'unknown'} format"
             f"{trained}): "
             f"{report.rows_read} rows read, {len(report.rejected)} rejected, {report.dropped_total} dropped, "
             f"{kept} kept"]
    # One source that is the split itself in aligner's own format says nothing new; anything else does.
    if len(report.sources) > 1 or any(s.layout != "native" or s.used != s.valid for s in report.sources):
        lines.append("  sources:")
        lines += [f"    {s.describe()}" for s in report.sources]
    lines += [f"  problem: {p}" for p in report.problems]
    if report.rejected:
        lines.append("  rejected rows:")
        lines += _listed([r.message for r in report.rejected])
    if report.dropped:
        reasons = ", ".join(f"{n} {why}" for why, n in report.dropped.most_common())
        over = " - more than data.max_drop_fraction" if report.drop_fraction > report.max_drop_fraction else ""
        lines.append(f"  dropped by training ({report.drop_fraction:.0%} of valid rows, limit "
                     f"{report.max_drop_fraction:.0%}{over}): {reasons}")
        lines += _listed([f"{loc}: {why}" for loc, why in report.dropped_rows])
    if report.lengths:
        s = report.lengths
        lines.append(f"  tokens per row before truncation (prompt + longest completion): min {s['min']}, "
                     f"median {s['median']:g}, p95 {s['p95']}, max {s['max']}")
        lines.append(f"  truncation (max_length {report.max_length}, max_prompt_length {report.max_prompt_length}): "
                     f"touches {report.truncation_touches} rows, empties {report.truncation_empties}")
    extras = [f"{report.duplicates} duplicate rows"]
    if (report.trained_as or report.data_format) == PREFERENCE:
        extras.append(f"{report.identical_pairs} identical chosen/rejected pairs")
    if report.split == "eval":
        extras.append(f"{report.in_train} rows also in train")
    lines.append("  " + ", ".join(extras))
    if report.token_views:
        per_source = Counter(source for source, _ in {(v.source, v.location) for v in report.token_views})
        lines.append(f"  tokens of the first {max(per_source.values())} rows of each source "
                     "([...] is prompt, not trained on; what follows is trained on; | between tokens):")
        lines += [f"    {v.render()}" for v in report.token_views]
    return "\n".join(lines)


def format_reports(reports: list[SplitReport]) -> str:
    """Every split's report and a closing verdict line."""
    body = [format_report(r) for r in reports]
    failed = [r for r in reports if r.failed]
    if failed:
        rejected = sum(len(r.rejected) for r in reports)
        body.append(f"data check failed: {rejected} rejected rows; {len(failed)} of {len(reports)} splits have "
                    "rejected rows, problems or drop more than data.max_drop_fraction")
    else:
        body.append(f"data check passed: {len(reports)} splits")
    return "\n".join(body)


def check_stage(config: RunConfig, index: int, tokenizer: Any, show_tokens: int = SHOW_TOKENS) -> list[SplitReport]:
    """Reports for the train and eval splits of one stage (``show_tokens`` rows per source shown as tokens).

    The stage is prepared by training's own code (``aligner.training.stages``), collecting every
    problem instead of stopping at the first: unknown plugins and bad options, rows whose format the
    algorithm or a loss cannot train on, every rejected row, a template or prompt limit that cannot
    work. Problems of the stage are reported on its train split, those that keep every split from
    being tokenized on every split."""
    stage = config.stages[index]
    data = stage.data
    problems = Problems(collect=True)
    _, rows = prepare_stage_collecting(config, index, problems)
    if rows.train is None:
        return [SplitReport(stage.name, "train", source_label(data.train), data.format,
                            rejected=rows.train_rejected, problems=problems.messages, sources=rows.train_sources)]
    splits = [("train", source_label(data.train), rows.train, rows.train_rejected, rows.train_sources)]
    if rows.eval_label is not None:
        splits.append(("eval", rows.eval_label, rows.eval, rows.eval_rejected, rows.eval_sources))
    every_split = Problems(collect=True)
    template = every_split.attempt(lambda: stage_template(stage, index, is_chat(rows.train[:1], rows.eval[:1]),
                                                          tokenizer))
    max_prompt_length = every_split.attempt(lambda: prompt_token_limit(data, rows.data_format, rows.generation_tokens,
                                                                       stage.name, index))
    max_prompt_length = data.max_prompt_length if max_prompt_length is None else max_prompt_length
    trained_as = rows.data_format if rows.data_format != rows.row_format else None
    train_keys = {_row_key(r) for r in rows.train}
    reports = []
    for split, source, split_rows, rejected, sources in splits:
        tokenized = (tokenize_rows(split_rows, rows.data_format, tokenizer, template, data.max_length,
                                   max_prompt_length) if template is not None else None)
        report = split_report(stage.name, split, source, data, rows.row_format, split_rows, rejected, tokenized,
                              train_keys if split == "eval" else None, trained_as=trained_as)
        report.max_prompt_length = max_prompt_length  # the limit in force (prompt-only data leaves room)
        report.sources = sources
        report.problems = (problems.messages if split == "train" else []) + every_split.messages
        if tokenized is not None:
            report.token_views = token_views(split_rows, tokenized, tokenizer, show_tokens)
        reports.append(report)
    return reports


def check_data(config: str | Path | dict | RunConfig, overrides: list[str] | tuple[str, ...] = (),
               show_tokens: int = SHOW_TOKENS) -> list[SplitReport]:
    """Check the data of every stage of ``config`` (tokenizer loaded, no model); one report per split.

    ``show_tokens``: rows per source of each split shown token by token (0: none)."""
    from aligner.modeling.loading import load_tokenizer

    resolved = load_config(config, overrides)
    tokenizer = load_tokenizer(resolved)
    return [report for i in range(len(resolved.stages))
            for report in check_stage(resolved, i, tokenizer, show_tokens)]


def enforce_drop_limit(stage: str, split: str, data: DataConfig, data_format: str, rows: list[Row],
                       tokenized: TokenizedData) -> None:
    """Stop the run (``DataError``) when tokenization dropped more than ``data.max_drop_fraction`` of ``rows``.

    The full report goes to the log first, so the one-line error can point at it.
    """
    if not rows or sum(tokenized.dropped.values()) / len(rows) <= data.max_drop_fraction:
        return
    train = source_label(data.train)
    source = train if split == "train" else source_label(data.eval) if data.eval else f"held out from {train}"
    report = split_report(stage, split, source, data, data_format,
                          rows, [], tokenized)
    log.error("%s", format_report(report))
    reasons = ", ".join(f"{n} {why}" for why, n in report.dropped.most_common())
    raise DataError(f"stage '{stage}' {split}: {report.dropped_total} of {len(rows)} rows "
                    f"({report.drop_fraction:.0%}) would be dropped ({reasons}), more than "
                    f"data.max_drop_fraction={data.max_drop_fraction:g}; see the report above or run "
                    "'aligner data check'")


def data_summary(stages: list[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per stage and split: rows, kept, dropped by reason and truncated, for ``summary.json``."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for stage in stages:
        for split in ("train", "eval"):
            rows = getattr(stage, f"{split}_rows")
            tokenized = getattr(stage, f"{split}_data")
            if tokenized is None:
                continue
            summary.setdefault(stage.name, {})[split] = {
                "rows": len(rows), "kept": len(tokenized.examples), "dropped": dict(tokenized.dropped),
                "truncated": tokenized.truncated_rows}
    return summary
