"""Reading a score or a choice out of a judge model's free-text reply.

Models asked for "Score: N" answer "Score: 7", "**Score:** 7/10", "I'd give it 8 out of 10",
``{"score": 7}`` or just "7". The readers below accept all of these and return ``None`` (with the
reason) rather than guess when the reply is ambiguous or out of range, so the caller can ask again.
"""

from __future__ import annotations

import json
import re

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_LABELLED = re.compile(r"\b(?:score|rating)\b[^0-9\n-]{0,12}?" + _NUMBER, re.IGNORECASE)
_FRACTION = re.compile(_NUMBER + r"\s*(?:/|out of)\s*\d+(?:\.\d+)?", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def _from_json(text: str) -> float | None:
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        return None
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return None
    value = data.get("score", data.get("rating")) if isinstance(data, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_score(text: str, low: float, high: float) -> tuple[float | None, str]:
    """The score in ``text`` if one can be read unambiguously within ``[low, high]``.

    Returns ``(score, "")`` or ``(None, reason)``. Tried in order: a JSON object with ``score``,
    a labelled number ("Score: 7"), a fraction ("7/10", "7 out of 10"), a reply holding exactly one number.
    """
    value = _from_json(text)
    if value is None:
        for pattern in (_LABELLED, _FRACTION):
            match = pattern.search(text)
            if match:
                value = float(match.group(1))
                break
    if value is None:
        numbers = _ANY_NUMBER.findall(text)
        if len(numbers) == 1:
            value = float(numbers[0])
        elif numbers:
            return None, f"several numbers and no 'Score:' label in the reply {_snippet(text)}"
        else:
            return None, f"no score in the reply {_snippet(text)}"
    if not low <= value <= high:
        return None, f"score {value:g} is outside [{low:g}, {high:g}] in the reply {_snippet(text)}"
    return value, ""


_ONLY_LETTER = re.compile(r"^\W*([AB])\W*$", re.IGNORECASE)
_LABELLED_CHOICE = re.compile(
    r"\b(?:answer|response|winner|choice|better|prefer(?:red)?)\b\W{0,3}(?:is\W{0,3})?(?:response\W{0,3})?\(?([AB])\b",
    re.IGNORECASE,
)
_LETTER = re.compile(r"\b([AB])\b")


def parse_choice(text: str) -> tuple[str | None, str]:
    """``"A"`` or ``"B"`` from a pairwise verdict, or ``(None, reason)`` when it cannot be told."""
    for pattern in (_ONLY_LETTER, _LABELLED_CHOICE):
        match = pattern.search(text.strip())
        if match:
            return match.group(1).upper(), ""
    letters = set(_LETTER.findall(text))
    if len(letters) == 1:
        return letters.pop(), ""
    return None, f"no clear 'A' or 'B' in the reply {_snippet(text)}"


def _snippet(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
