"""What tokenizing rows gives (``TokenizedData``), apart from how it is made.

``aligner.data.tokenize`` makes it and ``aligner.data.token_cache`` stores and rebuilds it; both read
it from here, so the cache does not import the tokenizer code that calls it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aligner.data.examples import CompactExamples
from aligner.data.rows import Row
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED

COMPLETION_FIELDS = {SFT: ("completion",), PREFERENCE: ("chosen", "rejected"), UNPAIRED: ("completion",), PROMPT_ONLY: ()}


@dataclass
class TokenizedData:
    """Token ids of every kept row, plus counts of what truncation did."""

    data_format: str
    # ``CompactExamples`` (ids as int32 arrays, dicts of lists on access) from ``tokenize_rows``.
    examples: Sequence[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)
    truncated_rows: int = 0
    # Where each dropped row came from and why, for ``aligner data check`` and the drop-limit report.
    dropped_rows: list[tuple[str, str]] = field(default_factory=list)
    # Tokens per input row before truncation (prompt + longest completion), kept or not.
    full_lengths: list[int] = field(default_factory=list)
    # Input row index of each ``dropped_rows`` entry: a cache entry stores indices, not locations.
    dropped_ids: list[int] = field(default_factory=list)

    def drop(self, row: Row, reason: str, row_id: int = -1) -> None:
        """Count ``row`` (input row ``row_id``) as dropped for ``reason``."""
        self.dropped[reason] += 1
        self.dropped_rows.append((row.location, reason))
        self.dropped_ids.append(row_id)

    def lengths(self, shared_prompt: bool = False) -> list[int]:
        """Tokens per example as batched, for length grouping: prompt + longest completion.

        With ``shared_prompt`` a preference pair is one row of prompt + chosen + rejected
        (``aligner.modeling.shared_prompt``), so that total is what grouping must even out.
        """
        fields = COMPLETION_FIELDS[self.data_format]
        if isinstance(self.examples, CompactExamples):  # from the offsets, without building a dict per example
            total = self.examples.id_lengths("prompt")
            if shared_prompt and self.data_format == PREFERENCE:
                return (total + self.examples.id_lengths("chosen") + self.examples.id_lengths("rejected")).tolist()
            if fields:
                total = total + np.max([self.examples.id_lengths(f) for f in fields], axis=0)
            return total.tolist()
        if shared_prompt and self.data_format == PREFERENCE:
            return [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in self.examples]
        return [len(e["prompt_ids"]) + max((len(e[f + "_ids"]) for f in fields), default=0) for e in self.examples]


def prompt_for_judge(prompt: str | list[dict[str, str]]) -> str:
    """The plain text a judge sees as the prompt: the string, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]
