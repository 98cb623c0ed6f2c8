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
CARRY_FREE = True
"""Only problems without carries or borrows (see the module docstring for why)."""

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


def _digits_fit(a: int, b: int, op: str) -> bool:
    """Whether ``a op b`` is carry-free: no digit column carries (addition) or borrows (subtraction)."""
    while a or b:
        column = a % 10 + b % 10 if op == "+" else a % 10 - b % 10
        if not 0 <= column <= 9:
            return False
        a, b = a // 10, b // 10
    return True


def problems() -> list[tuple[int, str, int]]:
    """Every problem ``(a, op, b)`` of the task: operands in ``LOW..HIGH``, carry-free, ``a >= b`` for ``-``."""
    operands = range(LOW, HIGH + 1)
    return [(a, op, b) for a in operands for b in operands for op in "+-"
            if (op == "+" or a >= b) and (not CARRY_FREE or _digits_fit(a, b, op))]


def operand_pair(problem: tuple[int, str, int]) -> frozenset[int]:
    """The unordered operand pair of a problem: the unit that is either trained on or held out."""
    return frozenset((problem[0], problem[2]))


def split_problems() -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
    """(training problems, held-out problems): a seeded ``HELD_OUT_FRACTION`` of the unordered operand
    pairs is held out with every problem over it, so a held-out pair is never seen in either order
    or operation."""
    every = problems()
    pairs = sorted({tuple(sorted(operand_pair(p))) for p in every})
    held = {frozenset(p) for p in random.Random(0).sample(pairs, round(len(pairs) * HELD_OUT_FRACTION))}
    return [p for p in every if operand_pair(p) not in held], [p for p in every if operand_pair(p) in held]


def make_problem(rng: random.Random, problem: tuple[int, str, int]) -> tuple[str, str, int]:
    """(prompt, SFT completion, answer) for a problem in a random phrasing."""
    a, op, b = problem
    result = a + b if op == "+" else a - b
    phrasing = rng.choice(ADD_PROMPTS if op == "+" else SUB_PROMPTS)
    prompt = phrasing.format(a=a, b=b, noun=rng.choice(NOUNS))
    return prompt, f"{a} {op} {b} = {result}. The answer is {result}.", result


def make_rows(pool: list[tuple[int, str, int]], count: int, kind: str, seed: int) -> list[dict]:
    """``count`` rows of ``kind`` (``sft`` or ``prompt``) over problems drawn from ``pool``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt, completion, answer = make_problem(rng, rng.choice(pool))
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
    train, held_out = split_problems()
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
