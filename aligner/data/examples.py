"""Tokenized examples held compactly: every id field as one flat int32 array plus offsets.

A Python list of token ids costs about 36 bytes per id (an 8-byte pointer and a 28-byte int object
for every id above 256); one int32 costs 4. At a million short preference rows that is the
difference between gigabytes and a few hundred megabytes. ``CompactExamples`` keeps the arrays
and hands out, on each access, the same dict of plain Python lists that the tokenizer used to
store (``row_id``, ``prompt_ids``, ``prompt``, ``<field>_ids``, and ``label``/``margin`` where the
row has them), so every reader (collate, samplers, evaluation, generation, the reference cache)
works unchanged. It is read-only: a dict it returns is a fresh copy, and editing it changes nothing.

Only ids live in the arrays: an example's prompt text (for judges), label and margin are read from
its row when the example is asked for (``rows[row_id].data``), so a million examples hold no
million Python strings beside the rows they came from (themselves compact: ``aligner.data.rows``).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# The ``array`` type code of a 4-byte signed int (C ``int`` on every platform aligner runs on).
_INT32 = next(code for code in ("i", "l") if array(code).itemsize == 4)


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
                 rows: Sequence[Any], with_labels: bool, prompt_text: Callable[[Any], Any]):
        self.fields = fields  # id fields, "prompt" first: ("prompt", "chosen", "rejected")
        self.row_ids = row_ids
        self.ids = ids  # field -> (flat int32 ids, int64 offsets)
        self.rows = rows  # the tokenized rows: text, label and margin are read from rows[row_id].data
        self.with_labels = with_labels
        self.prompt_text = prompt_text  # a row's prompt -> the judge's text

    def __len__(self) -> int:
        return len(self.row_ids)

    def _example(self, i: int) -> dict[str, Any]:
        row_id = int(self.row_ids[i])
        data = row_data(self.rows, row_id)
        example: dict[str, Any] = {"row_id": row_id}
        for f in self.fields:
            flat, offsets = self.ids[f]
            example[f + "_ids"] = flat[offsets[i]:offsets[i + 1]].tolist()
            if f == "prompt":
                example["prompt"] = self.prompt_text(data["prompt"])
        if self.with_labels:
            example["label"] = data["label"]
        if "margin" in data:
            example["margin"] = data["margin"]
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
        """Bytes of the id arrays (prompts, labels and margins are the rows')."""
        return int(self.row_ids.nbytes + sum(a.nbytes + o.nbytes for a, o in self.ids.values()))


def row_data(rows: Sequence[Any], i: int) -> dict[str, Any]:
    """``rows[i].data``, without building the row's location where ``rows`` can skip it."""
    data_at = getattr(rows, "data_at", None)
    return data_at(i) if data_at is not None else rows[i].data


class ExampleBuilder:
    """Collects kept examples one at a time straight into growing int arrays (``array``: 4 bytes an
    id, grown in place), handed to numpy without a copy, so the ids of a large dataset are never
    held as Python lists, nor twice over."""

    def __init__(self, fields: tuple[str, ...], with_labels: bool):
        self.fields, self.with_labels = fields, with_labels
        self._ids = {f: array(_INT32) for f in fields}
        self._ends = {f: array("q") for f in fields}
        self._row_ids = array("q")

    def add(self, row_id: int, ids: dict[str, list[int]]) -> None:
        """Keep the example of row ``row_id``: ``ids`` maps every field (``prompt`` included) to its token ids."""
        self._row_ids.append(row_id)
        for f in self.fields:
            flat = self._ids[f]
            flat.extend(ids[f])
            self._ends[f].append(len(flat))

    def build(self, rows: Sequence[Any], prompt_text: Callable[[Any], Any]) -> CompactExamples:
        """The examples added so far, as one ``CompactExamples`` over ``rows`` (what ``row_id`` indexes)."""
        ids = {}
        for f in self.fields:
            offsets = np.zeros(len(self._ends[f]) + 1, dtype=np.int64)
            offsets[1:] = np.frombuffer(self._ends[f], dtype=np.int64)
            # The array's memory becomes the numpy array's (no copy); the builder starts new ones.
            flat = np.frombuffer(self._ids[f], dtype=np.int32) if len(self._ids[f]) else np.zeros(0, dtype=np.int32)
            ids[f] = (flat, offsets)
        row_ids = np.frombuffer(self._row_ids, dtype=np.int64).copy()
        self._ids = {f: array(_INT32) for f in self.fields}
        self._ends = {f: array("q") for f in self.fields}
        self._row_ids = array("q")
        return CompactExamples(self.fields, row_ids, ids, rows, self.with_labels, prompt_text)


def compact_from_arrays(fields: tuple[str, ...], row_ids: np.ndarray, ids: dict[str, tuple[np.ndarray, np.ndarray]],
                        rows: Sequence[Any], with_labels: bool, prompt_text: Callable[[Any], Any]) -> CompactExamples:
    """``CompactExamples`` over stored arrays, with the text, label and margin of each example read from
    its row (``rows[row_id].data``; ``prompt_text`` turns a row's prompt into the judge's text)."""
    return CompactExamples(fields, row_ids, ids, rows, with_labels, prompt_text)
