"""The arithmetic task: two-digit addition and subtraction with checkable answers, for online RL.

Prompts ask for a sum or a difference, plainly ("What is 23 + 45?") or as a tiny word problem ("The
cat has 23 cups and gets 45 more. How many now?"); SFT completions restate the sum and give the
result twice ("23 + 45 = 68. The answer is 68."). Prompt rows carry the ground truth in an
``answer`` column, which the ``aligner.online.verifiers.final_answer`` reward checks. Subtraction
never goes below zero, so every answer is a non-negative integer.

SFT of a tiny model teaches the format and part of the arithmetic; carries stay hard for it, which
leaves room for RL with a verifiable reward to improve held-out accuracy.

Held-out rows use operand pairs never seen in training, in either operation or order: a pair
{a, b} is held out as a whole. ``python -m aligner.arithmetic.task`` rewrites the bundled files in
``aligner/arithmetic/data``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

LOW, HIGH = 10, 99
"""Operands are drawn from ``LOW..HIGH`` inclusive (two digits)."""
HELD_OUT_FRACTION = 0.1
"""Share of unordered operand pairs reserved for the held-out files."""

# Phrasings per operation, with {a} and {b} the operands as they appear in the sum ("a + b",
# "a - b"). They are kept short because the builtin tokenizer spells most words out in pieces:
# prompt + completion must fit a 64-token max_length.
ADD_PROMPTS = [
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Find {a} + {b}.",
    "The {noun} has {a} cups and gets {b} more. How many now?",
    "There were {a} birds and {b} more came. How many birds?",
]
SUB_PROMPTS = [
    "What is {a} - {b}?",
    "What is {a} minus {b}?",
    "Subtract {b} from {a}.",
    "Find {a} - {b}.",
    "The {noun} had {a} cups and lost {b}. How many now?",
    "There were {a} birds and {b} flew off. How many birds?",
]
NOUNS = ["cat", "dog", "boy", "girl"]

DATA_DIR = Path(__file__).parent / "data"


def operand_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs): unordered pairs (a <= b) over ``LOW..HIGH``, a seeded tenth held out."""
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(a, HIGH + 1)]
    held = set(random.Random(0).sample(pairs, round(len(pairs) * HELD_OUT_FRACTION)))
    return [p for p in pairs if p not in held], [p for p in pairs if p in held]


def make_problem(rng: random.Random, pair: tuple[int, int]) -> tuple[str, str, int]:
    """(prompt, SFT completion, answer) for a random operation and phrasing over an unordered pair."""
    small, large = pair
    if rng.random() < 0.5:
        # Addition in either order; subtraction always takes the smaller from the larger.
        a, b = (small, large) if rng.random() < 0.5 else (large, small)
        op, result, phrasings = "+", a + b, ADD_PROMPTS
    else:
        a, b = large, small
        op, result, phrasings = "-", a - b, SUB_PROMPTS
    prompt = rng.choice(phrasings).format(a=a, b=b, noun=rng.choice(NOUNS))
    return prompt, f"{a} {op} {b} = {result}. The answer is {result}.", result


def make_rows(pairs: list[tuple[int, int]], count: int, kind: str, seed: int) -> list[dict]:
    """``count`` rows of ``kind`` (``sft`` or ``prompt``) over the given operand pairs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt, completion, answer = make_problem(rng, rng.choice(pairs))
        if kind == "sft":
            rows.append({"prompt": prompt, "completion": completion})
        else:
            rows.append({"prompt": prompt, "answer": str(answer)})
    return rows


def _phrasing_pattern(phrasing: str) -> re.Pattern[str]:
    pattern = re.escape(phrasing)
    for field, group in (("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)"), ("noun", r"\w+")):
        pattern = pattern.replace(re.escape("{" + field + "}"), group)
    return re.compile(pattern)


_PATTERNS = [(_phrasing_pattern(p), 1) for p in ADD_PROMPTS] + [(_phrasing_pattern(p), -1) for p in SUB_PROMPTS]


def solve(prompt: str) -> int | None:
    """The answer to one of this task's prompts, or None for a prompt in none of its phrasings."""
    for pattern, sign in _PATTERNS:
        match = pattern.fullmatch(prompt.strip())
        if match:
            return int(match["a"]) + sign * int(match["b"])
    return None


def correctness(prompt: str, completion: str) -> float:
    """1.0 when the completion's final answer is right, else 0.0: a ``rule`` judge callable
    (``aligner.arithmetic.task:correctness``) for ``eval.generate``, which sees no answer column."""
    from aligner.online.verifiers import final_answer

    answer = solve(prompt)
    if answer is None:
        return 0.0
    return final_answer([prompt], [completion], answer=[str(answer)])[0] or 0.0


def write_files(directory: Path = DATA_DIR) -> None:
    """Regenerate the bundled data files (deterministic)."""
    train, held_out = operand_pairs()
    files = {
        "sft_train.jsonl": make_rows(train, 4000, "sft", seed=1),
        "sft_eval.jsonl": make_rows(held_out, 200, "sft", seed=2),
        "prompts_train.jsonl": make_rows(train, 2000, "prompt", seed=3),
        "prompts_eval.jsonl": make_rows(held_out, 200, "prompt", seed=4),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with (directory / name).open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_files()
