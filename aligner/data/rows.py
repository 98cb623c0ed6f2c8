"""Validated rows held compactly: one byte buffer per source, decoded one row at a time.

A million short rows as Python objects (a ``Row`` with a dict of strings and a location string each)
take about a kilobyte apiece: a gigabyte before anything is tokenized. Here a source's validated rows
are kept as ``RowBlock``: every row's dict serialized into one buffer (compact JSON: rows come from
JSON or Arrow data, so nothing is lost; anything else is kept as its text), its byte offsets, and its position in the source (the
line of a JSON Lines file, the row of a dataset) as an int array. ``Rows`` is the read-only sequence
the rest of aligner sees: ``rows[i]`` decodes one ``Row`` with the same ``data`` and the same
``location`` (``"train.jsonl, line 7"``) that a list of rows held, so every located message is
unchanged; slicing, ``select`` and mixtures are index arrays over the blocks, never copies of rows.

A block read back from the validated-rows cache (``aligner.data.rows_cache``) holds the same three
things as views of a memory-mapped Arrow file: its buffer is a ``memoryview`` of a ``pyarrow.Buffer``
over the mapped pages, so rows are decoded straight from the file and never copied into the process.

A ``Row`` handed out is a fresh copy: editing its ``data`` changes nothing stored.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# JSON rather than pickle: unpickling is never done on data (tests/test_safe_loading.py), even bytes
# made in this process. A value JSON has no type for (a date in a parquet column) is kept as its text.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


@dataclass
class Row:
    """One validated row and where it came from (for error messages)."""

    data: dict[str, Any]
    location: str


class RowBlock:
    """The validated rows of one source: serialized dicts, byte offsets and source positions."""

    def __init__(self, label: str, unit: str, buffer: bytes | bytearray | memoryview, offsets: np.ndarray,
                 positions: np.ndarray, keys: tuple[str, ...] = ()):
        self.label, self.unit = label, unit
        self.keys = keys  # a row stored as a tuple holds the values of these keys, in this order  # a row's location is "<label>, <unit> <position>"
        self.buffer = buffer  # a memoryview of a memory-mapped ``pyarrow.Buffer`` for a cached block
        self.mapped: Any = None  # the memory-mapped file a cached block's arrays view (kept open while in use)
        self.offsets = offsets  # int64, len(positions) + 1
        self.positions = positions  # int64 line (or row/item) numbers
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getstate__(self) -> dict[str, Any]:
        """A mapped block is pickled (or deep-copied) as its bytes: a memoryview and a mapped file cannot be."""
        state = dict(self.__dict__)
        if isinstance(self.buffer, memoryview):
            state["buffer"] = bytes(self.buffer)
            state["offsets"], state["positions"] = np.array(self.offsets), np.array(self.positions)
        state["mapped"] = None
        return state

    def data(self, i: int) -> dict[str, Any]:
        """Row ``i``'s validated dict (a fresh copy)."""
        value = json.loads(bytes(self.buffer[self.offsets[i]:self.offsets[i + 1]]))
        return dict(zip(self.keys, value, strict=True)) if isinstance(value, list) else value

    def location(self, i: int) -> str:
        """Row ``i``'s location, as error messages write it."""
        return f"{self.label}, {self.unit} {int(self.positions[i])}"

    def digest(self) -> str:
        """A hash of the rows' contents in order (not their locations), for fingerprints."""
        if self._digest is None:
            digest = hashlib.sha256(repr(self.keys).encode())
            digest.update(self.offsets.tobytes())
            digest.update(self.buffer)
            self._digest = digest.hexdigest()
        return self._digest

    def nbytes(self) -> int:
        """Bytes held (buffer, offsets and positions)."""
        return len(self.buffer) + self.offsets.nbytes + self.positions.nbytes


class RowBlockBuilder:
    """Appends validated rows one at a time into a ``RowBlock``'s buffer."""

    def __init__(self, label: str, unit: str = "line"):
        self.label, self.unit = label, unit
        self._buffer = bytearray()
        # ``array`` rather than lists: 8 bytes an entry, not a pointer plus an int object.
        self._ends = array("q")
        self._positions = array("q")
        self._keys: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self._positions)

    def append(self, data: dict[str, Any], position: int) -> None:
        """Keep ``data`` (the row's validated dict), found at ``position`` of the source."""
        if self._keys is None:
            self._keys = tuple(data)
        # A row with the first row's keys (in order) is stored as its values alone.
        value = tuple(data.values()) if tuple(data) == self._keys else data
        self._buffer += _encode(value).encode()
        self._ends.append(len(self._buffer))
        self._positions.append(position)

    def build(self) -> RowBlock:
        """The block of every row appended."""
        offsets = np.zeros(len(self._ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self._ends, dtype=np.int64)
        positions = np.frombuffer(self._positions, dtype=np.int64).copy()
        # The buffer is handed over, not copied (a copy would double the peak for a moment).
        block = RowBlock(self.label, self.unit, self._buffer, offsets, positions, self._keys or ())
        self._buffer, self._ends, self._positions, self._keys = bytearray(), array("q"), array("q"), None
        return block


class Rows(Sequence):
    """A read-only sequence of ``Row`` over one or more ``RowBlock`` (see the module docstring).

    ``index[k]`` is the row of block ``which[k]`` (block 0 when ``which`` is ``None``) at position
    ``k`` of the sequence.
    """

    __hash__ = None  # type: ignore[assignment]  # compared by value, like a list

    def __init__(self, blocks: list[RowBlock], index: np.ndarray | None = None, which: np.ndarray | None = None):
        self.blocks = blocks
        if index is None:
            if len(blocks) != 1:
                raise ValueError("rows over several blocks need an index")
            index = np.arange(len(blocks[0]), dtype=np.int64)
        self.index = index
        self.which = which

    @classmethod
    def of(cls, block: RowBlock) -> Rows:
        """All rows of one block, in order."""
        return cls([block])

    def __len__(self) -> int:
        return len(self.index)

    def _row(self, k: int) -> Row:
        block = self.blocks[0 if self.which is None else int(self.which[k])]
        i = int(self.index[k])
        return Row(block.data(i), block.location(i))

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.select(np.arange(len(self), dtype=np.int64)[key])
        k = int(key)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"row index {key} out of range ({len(self)} rows)")
        return self._row(k)

    def __iter__(self) -> Iterator[Row]:
        return (self._row(k) for k in range(len(self)))

    def data_at(self, k: int) -> dict[str, Any]:
        """Row ``k``'s data alone (its location is not built)."""
        return self.blocks[0 if self.which is None else int(self.which[k])].data(int(self.index[k]))

    def select(self, positions: Any) -> Rows:
        """The rows at ``positions`` (of this sequence), in that order, sharing the blocks."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        which = None if self.which is None else self.which[positions]
        return Rows(self.blocks, self.index[positions], which)

    def map_data(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Rows:
        """The same rows (same order and locations) with each one's data replaced by ``change(data)``,
        held compactly again: per block, a new block of only the rows these ``Rows`` use (a split of a
        large source re-encodes its own rows, not the whole source's)."""
        blocks, index = [], np.empty_like(self.index)
        for b, block in enumerate(self.blocks):
            mine = np.arange(len(self.index)) if self.which is None else np.flatnonzero(self.which == b)
            used, inverse = np.unique(self.index[mine], return_inverse=True)
            builder = RowBlockBuilder(block.label, block.unit)
            for i in used.tolist():
                builder.append(change(block.data(i)), int(block.positions[i]))
            blocks.append(builder.build())
            index[mine] = inverse
        return Rows(blocks, index, self.which)

    def location(self, k: int) -> str:
        """Row ``k``'s location without decoding its data."""
        block = self.blocks[0 if self.which is None else int(self.which[k])]
        return block.location(int(self.index[k]))

    def fingerprint(self) -> str:
        """A hash of the rows' contents in this order (blocks' digests and the index), not of locations."""
        digest = hashlib.sha256()
        for block in self.blocks:
            digest.update(block.digest().encode())
        digest.update(self.index.tobytes())
        if self.which is not None:
            digest.update(self.which.tobytes())
        return digest.hexdigest()

    def nbytes(self) -> int:
        """Bytes held by the blocks and the index arrays."""
        extra = 0 if self.which is None else self.which.nbytes
        return sum(b.nbytes() for b in self.blocks) + self.index.nbytes + extra

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __add__(self, other: Any) -> Any:
        if isinstance(other, Rows):
            return concat([self, other])
        return list(self) + list(other)

    def __radd__(self, other: Any) -> Any:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"Rows({len(self)} rows in {len(self.blocks)} block(s))"


def concat(parts: list[Rows]) -> Rows:
    """The rows of ``parts`` one after another, sharing their blocks."""
    blocks: list[RowBlock] = []
    indices, whiches = [], []
    for part in parts:
        start = len(blocks)
        blocks.extend(part.blocks)
        indices.append(part.index)
        which = np.zeros(len(part), dtype=np.int32) if part.which is None else part.which.astype(np.int32)
        whiches.append(which + start)
    if not parts:
        return Rows([RowBlockBuilder("").build()])
    index = np.concatenate(indices)
    which_all = np.concatenate(whiches)
    if len(blocks) == 1:
        return Rows(blocks, index)
    return Rows(blocks, index, which_all)

