"""The arithmetic task: two-digit addition and subtraction with checkable answers, for online RL.

Prompts ask for a sum or a difference, plainly ("What is 23 + 45?") or as a tiny word problem ("The
cat has 23 cups and gets 45 more. How many now?"); SFT completions restate the sum and give the
result twice ("23 + 45 = 68. The answer is 68."). Prompt rows carry the ground truth in an
``answer`` column, which the ``aligner.online.verifiers.final_answer`` reward checks.

Every problem is carry-free: no digit column of a sum carries and none of a difference borrows
(so differences are never negative either). Measured on the tiny 4-layer model, a column that
wraps around 10 is a modular-addition lookup it does not learn in minutes of CPU training, while
carry-free columns are learned: a short SFT reaches partial held-out accuracy (about half of the
answers right when sampling at temperature 1), which leaves room for RL with a verifiable reward.
Mixing carries in, even for half of the rows, stopped SFT from learning the carry-free ones too.

Held-out rows use operand pairs never seen in training, in either operation or order: an unordered
pair {a, b} is held out with every problem over it. ``python -m aligner.arithmetic.task`` rewrites
the bundled files in ``aligner/arithmetic/data``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from aligner.quickstart.task import write_jsonl_files

Problem = tuple[int, str, int]
"""``(a, op, b)`` with ``op`` ``"+"`` or ``"-"``: the problem ``a op b``."""

LOW, HIGH = 10, 99
"""Operands are drawn from ``LOW..HIGH`` inclusive (two digits)."""
HELD_OUT_FRACTION = 0.1
"""Share of unordered operand pairs reserved for the held-out files."""

# Phrasings per operation, with {a} and {b} the operands as they appear in the sum ("a + b",
# "a - b"). They are kept short because the builtin tokenizer spells most words out in pieces:
# prompt + completion stay within 52 tokens (a 64-token max_length leaves a margin).
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


def result(problem: Problem) -> int:
    """The value of ``a op b``."""
    a, op, b = problem
    return a + b if op == "+" else a - b


def carry_free(problem: Problem) -> bool:
    """Whether ``a op b`` needs no carry (addition) or borrow (subtraction) in any digit column."""
    a, op, b = problem
    while a or b:
        column = a % 10 + b % 10 if op == "+" else a % 10 - b % 10
        if not 0 <= column <= 9:
            return False
        a, b = a // 10, b // 10
    return True


def problems() -> list[Problem]:
    """Every problem of the task: carry-free, operands in ``LOW..HIGH``."""
    operands = range(LOW, HIGH + 1)
    return [(a, op, b) for a in operands for b in operands for op in "+-" if carry_free((a, op, b))]


def operand_pair(problem: Problem) -> frozenset[int]:
    """The unordered operand pair of a problem: the unit that is either trained on or held out."""
    return frozenset((problem[0], problem[2]))


def split_problems() -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): a seeded ``HELD_OUT_FRACTION`` of the unordered operand
    pairs is held out with every problem over it, so a held-out pair is never seen in either order
    or operation."""
    every = problems()
    pairs = sorted({tuple(sorted(operand_pair(p))) for p in every})
    held = {frozenset(p) for p in random.Random(0).sample(pairs, round(len(pairs) * HELD_OUT_FRACTION))}
    return [p for p in every if operand_pair(p) not in held], [p for p in every if operand_pair(p) in held]


def make_problem(rng: random.Random, problem: Problem) -> tuple[str, str, int]:
    """(prompt, SFT completion, answer) for a problem in a random phrasing."""
    a, op, b = problem
    value = result(problem)
    phrasing = rng.choice(ADD_PROMPTS if op == "+" else SUB_PROMPTS)
    prompt = phrasing.format(a=a, b=b, noun=rng.choice(NOUNS))
    return prompt, f"{a} {op} {b} = {value}. The answer is {value}.", value


def make_rows(pool: list[Problem], count: int, kind: str, seed: int) -> list[dict]:
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


_PATTERNS = [(_phrasing_pattern(p), "+") for p in ADD_PROMPTS] + [(_phrasing_pattern(p), "-") for p in SUB_PROMPTS]


def parse_prompt(prompt: str) -> Problem | None:
    """The problem a prompt of this task asks, or None for a prompt in none of its phrasings."""
    for pattern, op in _PATTERNS:
        match = pattern.fullmatch(prompt.strip())
        if match:
            return int(match["a"]), op, int(match["b"])
    return None


def correctness(prompt: str, completion: str) -> float:
    """1.0 when the completion's final answer is right, else 0.0: a ``rule`` judge callable
    (``aligner.arithmetic.task:correctness``) for ``eval.generate``, whose judges see the prompt
    text but not the ``answer`` column."""
    from aligner.online.verifiers import final_answer

    problem = parse_prompt(prompt)
    if problem is None:
        return 0.0
    return final_answer([prompt], [completion], answer=[str(result(problem))])[0] or 0.0


def write_files(directory: Path = DATA_DIR) -> None:
    """Regenerate the bundled data files (deterministic)."""
    train, held_out = split_problems()
    files = {
        "sft_train.jsonl": make_rows(train, 8000, "sft", seed=1),
        "sft_eval.jsonl": make_rows(held_out, 200, "sft", seed=2),
        "prompts_train.jsonl": make_rows(train, 2000, "prompt", seed=3),
        "prompts_eval.jsonl": make_rows(held_out, 200, "prompt", seed=4),
    }
    write_jsonl_files(directory, files)


if __name__ == "__main__":
    write_files()
