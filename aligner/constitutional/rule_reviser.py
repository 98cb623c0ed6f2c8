"""A rule-based critic and reviser for the quickstart task (``reviser:`` in a revise config).

The quickstart's tiny model speaks a language of one sentence shape ("The red cat is kind and
calm.") and cannot follow a critique request. This stand-in does what a capable model asked by the
bundled constitution would do: name the unkind adjectives of an answer and rewrite the answer with
a kind adjective in place of each. The model still writes every answer; only the critique and the
revision come from the rule, so the plumbing around them (rounds, principles, chains, resume) is
the same as with a real model.
"""

from __future__ import annotations

import re

from aligner.constitutional.constitution import Principle
from aligner.quickstart.task import FRIENDLY, UNFRIENDLY

# Each unkind adjective has a kind counterpart at the same position (rude -> kind, ugly -> lovely, ...).
KINDER = dict(zip(UNFRIENDLY, FRIENDLY, strict=True))
_UNKIND = re.compile(r"\b(" + "|".join(UNFRIENDLY) + r")\b", re.IGNORECASE)


def kind_reviser(prompt: str, answer: str, principle: Principle) -> tuple[str, str]:
    """(critique, revision) of ``answer``: the unkind adjectives it uses, and the answer with kind ones."""
    unkind = [m.group(0) for m in _UNKIND.finditer(answer)]
    if not unkind:
        return "The answer uses no unkind word.", answer
    critique = f"The answer calls it {' and '.join(unkind)}, which is unkind."
    return critique, _UNKIND.sub(lambda m: KINDER[m.group(0).lower()], answer)
