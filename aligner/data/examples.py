"""Tokenized examples held compactly: every id field as one flat int32 array plus offsets.

A Python list of token ids costs about 36 bytes per id (an 8-byte pointer and a 28-byte int object
for every id above 256); one int32 costs 4. At a million short preference rows that is the
difference between gigabytes and a few hundred megabytes. ``CompactExamples`` keeps the arrays
and hands out, on each access, the same dict of plain Python lists that the tokenizer used to
store (``row_id``, ``prompt_ids``, ``prompt``, ``<field>_ids``, and ``label``/``margin`` where the
row has them), so every reader (collate, samplers, evaluation, generation, the reference cache)
works unchanged. It is read-only: a dict it returns is a fresh copy, and editing it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# A row without a margin (``margin`` is optional per row).
_NO_MARGIN = object()


def flatten(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists as one flat int32 array and int64 offsets (``offsets[i]:offsets[i+1]``)."""
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)), out=offsets[1:])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


class CompactExamples(Sequence):
    """A read-only sequence of example dicts, stored as arrays (see the module docstring)."""

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container compared by value

    def __init__(self, fields: tuple[str, ...], row_ids: np.ndarray, ids: dict[str, tuple[np.ndarray, np.ndarray]],
                 prompts: list[Any], labels: list[Any] | None = None, margins: list[Any] | None = None):
        self.fields = fields  # id fields, "prompt" first: ("prompt", "chosen", "rejected")
        self.row_ids = row_ids
        self.ids = ids  # field -> (flat int32 ids, int64 offsets)
        self.prompts = prompts
        self.labels = labels
        self.margins = margins

    def __len__(self) -> int:
        return len(self.row_ids)

    def _example(self, i: int) -> dict[str, Any]:
        example: dict[str, Any] = {"row_id": int(self.row_ids[i])}
        for f in self.fields:
            flat, offsets = self.ids[f]
            example[f + "_ids"] = flat[offsets[i]:offsets[i + 1]].tolist()
            if f == "prompt":
                example["prompt"] = self.prompts[i]
        if self.labels is not None:
            example["label"] = self.labels[i]
        if self.margins is not None and self.margins[i] is not _NO_MARGIN:
            example["margin"] = self.margins[i]
        return example

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._example(i) for i in range(*index.indices(len(self)))]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example index {index} out of range ({len(self)} examples)")
        return self._example(i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self._example(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __repr__(self) -> str:
        return f"CompactExamples({len(self)} examples, fields {', '.join(self.fields)})"

    def id_lengths(self, f: str) -> np.ndarray:
        """Tokens of field ``f`` in every example."""
        return np.diff(self.ids[f][1])

    def nbytes(self) -> int:
        """Bytes of the id arrays (the Python objects of prompts and labels are the rows')."""
        return int(self.row_ids.nbytes + sum(a.nbytes + o.nbytes for a, o in self.ids.values()))


class ExampleBuilder:
    """Collects kept examples one at a time and packs them into arrays every ``chunk`` examples, so
    the ids of a large dataset are never held as Python lists all at once."""

    def __init__(self, fields: tuple[str, ...], with_labels: bool, chunk: int = 4096):
        self.fields, self.with_labels, self.chunk = fields, with_labels, chunk
        self._pending: dict[str, list[list[int]]] = {f: [] for f in fields}
        self._packed: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {f: [] for f in fields}
        self.row_ids: list[int] = []
        self.prompts: list[Any] = []
        self.labels: list[Any] = []
        self.margins: list[Any] = []

    def add(self, row_id: int, prompt_text: Any, ids: dict[str, list[int]], label: Any = None,
            margin: Any = _NO_MARGIN) -> None:
        """Keep one example: ``ids`` maps every field (``prompt`` included) to its token ids."""
        self.row_ids.append(row_id)
        self.prompts.append(prompt_text)
        self.labels.append(label)
        self.margins.append(margin)
        for f in self.fields:
            self._pending[f].append(ids[f])
        if len(self._pending[self.fields[0]]) >= self.chunk:
            self._pack()

    def _pack(self) -> None:
        for f in self.fields:
            if self._pending[f]:
                self._packed[f].append(flatten(self._pending[f]))
                self._pending[f] = []

    def build(self) -> CompactExamples:
        """The examples added so far, as one ``CompactExamples``."""
        self._pack()
        ids = {}
        for f in self.fields:
            parts = self._packed[f]
            flats = [p[0] for p in parts] or [np.zeros(0, dtype=np.int32)]
            # Each part's offsets start at 0: shift them by the ids before it and drop the repeated 0.
            starts = np.cumsum([0] + [len(p[0]) for p in parts])
            offsets = [np.zeros(1, dtype=np.int64)] + [p[1][1:] + s for p, s in zip(parts, starts, strict=False)]
            ids[f] = (np.concatenate(flats), np.concatenate(offsets))
        margins = self.margins if any(m is not _NO_MARGIN for m in self.margins) else None
        return CompactExamples(self.fields, np.asarray(self.row_ids, dtype=np.int64), ids, self.prompts,
                               self.labels if self.with_labels else None, margins)


def compact_from_arrays(fields: tuple[str, ...], row_ids: np.ndarray, ids: dict[str, tuple[np.ndarray, np.ndarray]],
                        rows: list[Any], with_labels: bool, prompt_text: Any) -> CompactExamples:
    """``CompactExamples`` over stored arrays, with the text, label and margin of each example read from
    its row (``rows[row_id].data``; ``prompt_text`` turns a row's prompt into the judge's text)."""
    picked = [rows[i].data for i in row_ids.tolist()]
    margins = [d.get("margin", _NO_MARGIN) for d in picked]
    return CompactExamples(fields, row_ids, ids, [prompt_text(d["prompt"]) for d in picked],
                           [d["label"] for d in picked] if with_labels else None,
                           margins if any(m is not _NO_MARGIN for m in margins) else None)
