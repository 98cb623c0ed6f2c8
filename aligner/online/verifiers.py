"""Built-in reward functions (verifiers) for online RL, in the TRL-compatible batch convention.

Each function is called once per batch of rollouts::

    fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]

where ``kwargs`` holds every other column of the prompt rows (e.g. ``answer``) as a list with one value
per sample (None where a row lacks it), plus the reward source's own ``options`` from the config. Each
function returns exactly one value per completion; None means "does not apply to this sample".

- ``final_answer``: 1.0 when the completion's final number equals the row's ``answer`` (exact
  fractions, so ``0.5 == 1/2 == .50``), else 0.0;
- ``format_regex``: 1.0 when the stripped completion fully matches a regular expression, else 0.0;
- ``length_penalty``: DAPO's soft overlong penalty: 0 up to ``max_tokens - buffer`` completion tokens,
  then linear down to ``-penalty`` at ``max_tokens`` and beyond.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

__all__ = ["final_answer", "format_regex", "length_penalty", "extract_final_answer", "parse_number"]

# The last of these markers introduces the final answer ("The answer is 68.", "Answer: 68", GSM8K's
# "#### 68"); case-insensitive so that sentence-initial and mid-sentence forms both count.
_MARKER = re.compile(r"answer\s+is|answer\s*:|####", re.IGNORECASE)

# A number as written in text: optional sign, an integer part with or without thousands separators,
# an optional decimal part (or a bare ".5"), and an optional "/denominator". The sign is only taken
# where it cannot be a binary operator ("68-23" is 68 and 23, "= -22" is -22), and a match never
# starts inside another number (so "1.2.3" does not yield ".2"). A comma that does not separate
# thousands separates numbers: "1,2,3" is 1, 2 and 3.
_NUMBER = re.compile(
    r"(?<![\d.])"
    r"(?:(?<![\w)\].])(?P<sign>[+\-\u2212]))?"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<denominator>\d+))?"
)
# A comma between a digit and exactly three digits is a thousands separator ("1,234"), not a list.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-", "\ufe63": "-", "\uff0d": "-"})


def _check_batch(name: str, completions: Sequence[str], **columns: Sequence[Any] | None) -> int:
    """The batch size; a ValueError when a per-sample column has a different length, since
    misaligned columns would silently score one sample against another's reference."""
    size = len(completions)
    for column, values in columns.items():
        if values is not None and len(values) != size:
            raise ValueError(f"{name}: '{column}' has {len(values)} values for {size} completions")
    return size


def parse_number(text: Any) -> Fraction | None:
    """A reference value as an exact fraction, or None when it is not a single number.

    Accepts ints and floats (JSON numbers) and strings such as ``" 1,234 "``, ``"+68."``, ``"-3"``
    with a unicode minus, ``".50"`` or ``"1/2"``: whitespace, thousands separators, a trailing period
    and a leading ``+`` are ignored.
    """
    if isinstance(text, bool):
        # bool is an int subclass; True is not the number 1 as an answer.
        return None
    if isinstance(text, numbers.Integral):
        return Fraction(int(text))
    if isinstance(text, numbers.Real):
        # Through str() so that 0.1 is 1/10, as it was written, not its binary approximation.
        try:
            return Fraction(str(text))
        except (ValueError, OverflowError):  # nan, inf
            return None
    if not isinstance(text, str):
        return None
    cleaned = re.sub(r"\s+", "", text.translate(_MINUS_SIGNS))
    cleaned = _THOUSANDS.sub("", cleaned).rstrip(".").lstrip("+")
    if cleaned.startswith("$"):
        cleaned = cleaned[1:]
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?", cleaned):
        return None
    numerator, _, denominator = cleaned.partition("/")
    try:
        value = Fraction(numerator)
        return value / int(denominator) if denominator else value
    except (ValueError, ZeroDivisionError):
        return None


def _to_fraction(match: re.Match[str]) -> Fraction | None:
    value = Fraction(match["body"].replace(",", ""))
    if match["denominator"] is not None:
        if int(match["denominator"]) == 0:
            return None
        value /= int(match["denominator"])
    return -value if match["sign"] in ("-", "\u2212") else value


def extract_final_answer(text: str) -> Fraction | None:
    """The final answer of a text as an exact fraction, or None when it has no number.

    The final answer is the first number after the last "answer is" / "Answer:" / "####" marker that
    has a number after it, else the last number in the text.
    """
    if not isinstance(text, str):
        return None
    numbers_found = list(_NUMBER.finditer(text))
    if not numbers_found:
        return None
    for marker in reversed(list(_MARKER.finditer(text))):
        after = next((m for m in numbers_found if m.start() >= marker.end()), None)
        if after is not None:
            return _to_fraction(after)
    # Walk back past a "x/0" the parser refuses, so the answer is still a number when one exists.
    for match in reversed(numbers_found):
        value = _to_fraction(match)
        if value is not None:
            return value
    return None


def _reference(value: Any, index: int) -> Fraction | None:
    """The row's reference answer; a ValueError for one with no number, which is a data error that
    would otherwise make every completion for that row score 0."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parsed = parse_number(value)
    if parsed is None and isinstance(value, str):
        # A reference written as a worked solution ("... #### 72") is read like a completion.
        parsed = extract_final_answer(value)
    if parsed is None:
        raise ValueError(f"final_answer: the 'answer' of sample {index} ({value!r}) is not a number")
    return parsed


def final_answer(prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 answer: Sequence[Any] | None = None, **_: Any) -> list[float | None]:
    """1.0 where the completion's final answer equals the row's ``answer`` numerically, else 0.0.

    The final answer is the number after the last "answer is" / "Answer:" / "####" marker, else the
    last number in the completion (see ``extract_final_answer``); a completion without a number
    scores 0.0. Both sides are compared as exact fractions after normalisation (spaces, thousands
    separators, trailing period, leading ``+``, unicode minus), so ``0.5``, ``1/2`` and ``.50`` are
    equal and integers compare as integers. Samples whose row has no ``answer`` (None, or no such
    column at all) get None: the reward does not apply to them. A reference answer that contains
    no number raises ValueError.
    """
    size = _check_batch("final_answer", completions, completion_ids=completion_ids, answer=answer)
    if answer is None:
        return [None] * size
    rewards: list[float | None] = []
    for index, (completion, gold) in enumerate(zip(completions, answer, strict=True)):
        reference = _reference(gold, index)
        if reference is None:
            rewards.append(None)
            continue
        rewards.append(1.0 if extract_final_answer(completion) == reference else 0.0)
    return rewards


def format_regex(prompts: Sequence[str], completions: Sequence[str], pattern: str,
                 completion_ids: Sequence[Sequence[int]] | None = None, **_: Any) -> list[float | None]:
    """1.0 where ``re.fullmatch(pattern, completion.strip(), re.DOTALL)`` matches, else 0.0.

    The pattern is compiled once per call; an invalid one raises ValueError naming it (a reward that
    silently scored everything 0 would look like a model that never learns the format).
    """
    _check_batch("format_regex", completions, completion_ids=completion_ids)
    if not isinstance(pattern, str):
        raise ValueError(f"format_regex: 'pattern' must be a string, got {pattern!r}")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ValueError(f"format_regex: invalid pattern {pattern!r}: {exc}") from None
    return [1.0 if isinstance(text, str) and compiled.fullmatch(text.strip()) else 0.0 for text in completions]


def _whole(name: str, value: Any) -> int:
    """An integer option (YAML may give 16.0); a ValueError names the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise ValueError(f"length_penalty: '{name}' must be an integer, got {value!r}")
    return int(value)


def length_penalty(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
                   max_tokens: int, buffer: int, penalty: float = 1.0, **_: Any) -> list[float | None]:
    """DAPO's soft overlong penalty as a reward term, from ``len(completion_ids[i])``.

    0 for completions of up to ``max_tokens - buffer`` tokens; then linear, reaching ``-penalty`` at
    ``max_tokens`` tokens, and ``-penalty`` beyond. Set ``max_tokens`` to the generation limit so
    truncated completions get the full penalty. The length counts every id the caller passes (the
    sampler keeps the end-of-sequence token).
    """
    max_tokens, buffer = _whole("max_tokens", max_tokens), _whole("buffer", buffer)
    if max_tokens < 1:
        raise ValueError(f"length_penalty: 'max_tokens' must be at least 1, got {max_tokens}")
    if not 1 <= buffer <= max_tokens:
        raise ValueError(f"length_penalty: 'buffer' must be between 1 and max_tokens ({max_tokens}), got {buffer}")
    if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or penalty < 0:
        raise ValueError(f"length_penalty: 'penalty' must be a number >= 0, got {penalty!r}")
    if completion_ids is None:
        raise ValueError("length_penalty: needs 'completion_ids' (the completions' token ids)")
    _check_batch("length_penalty", completions, completion_ids=completion_ids)
    start = max_tokens - buffer
    rewards: list[float | None] = []
    for ids in completion_ids:
        overflow = min(max(len(ids) - start, 0), buffer)
        # Plain 0.0 rather than -0.0 inside the budget, so logged rewards read naturally.
        rewards.append(-float(penalty) * overflow / buffer if overflow else 0.0)
    return rewards
