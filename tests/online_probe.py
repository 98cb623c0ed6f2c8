"""A judge callable for tests of online algorithms run in other processes (``rule`` with
``callable: tests.online_probe:score``): it scores 1.0 when the completion holds an ``e``, records every
prompt it scores in ``$ALIGNER_PROBE_FILE.<rank>``, and returns NaN for the calls that
``$ALIGNER_PROBE_NAN`` (``RANK:FIRST-LAST``, 1-based calls of that rank) names."""

from __future__ import annotations

import json
import os

_calls = 0


def score(prompt: str, completion: str) -> float:
    """1.0 if ``completion`` contains an ``e``, else 0.0; NaN on the configured calls."""
    global _calls
    _calls += 1
    rank = os.environ.get("RANK", "0")
    path = os.environ.get("ALIGNER_PROBE_FILE")
    if path:
        with open(f"{path}.{rank}", "a") as handle:
            handle.write(json.dumps({"call": _calls, "prompt": prompt}) + "\n")
    nan = os.environ.get("ALIGNER_PROBE_NAN", "")
    if nan:
        nan_rank, _, span = nan.partition(":")
        first, _, last = span.partition("-")
        if nan_rank == rank and int(first) <= _calls <= int(last):
            return float("nan")
    return 1.0 if "e" in completion else 0.0
