"""The bundled arithmetic task: its files are what ``task.py`` writes, held-out pairs stay held out,
and every answer checks out with the ``final_answer`` verifier."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aligner.arithmetic import task
from aligner.online.verifiers import final_answer

FILES = ["sft_train.jsonl", "sft_eval.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl"]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (task.DATA_DIR / name).read_text().splitlines()]


def _operand_pair(prompt: str) -> frozenset[int]:
    """The two numbers a prompt mentions, read from its text (not through the task's own parser)."""
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    assert len(numbers) == 2, prompt
    return frozenset(numbers)


def test_bundled_files_are_what_task_py_generates(tmp_path: Path):
    task.write_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (task.DATA_DIR / name).read_bytes(), (
            f"{name} is stale: run `python -m aligner.arithmetic.task`")


def test_held_out_operand_pairs_never_appear_in_training():
    train = {_operand_pair(r["prompt"]) for name in ("sft_train.jsonl", "prompts_train.jsonl") for r in _rows(name)}
    held_out = {_operand_pair(r["prompt"]) for name in ("sft_eval.jsonl", "prompts_eval.jsonl") for r in _rows(name)}
    assert train and held_out
    assert not train & held_out
    # The split itself, over all problems: no pair on both sides, in either order or operation.
    train_problems, held_problems = task.split_problems()
    assert not {task.operand_pair(p) for p in train_problems} & {task.operand_pair(p) for p in held_problems}


@pytest.mark.parametrize("name", ["sft_train.jsonl", "sft_eval.jsonl"])
def test_every_sft_completion_has_the_right_final_answer(name: str):
    rows = _rows(name)
    # The truth from the prompt's own numbers and wording, independently of the completion.
    answers = []
    for row in rows:
        a, b = (int(n) for n in re.findall(r"\d+", row["prompt"]))
        subtract = re.search(r" - |minus|Subtract|lost|flew off", row["prompt"]) is not None
        answers.append(str(b - a if row["prompt"].startswith("Subtract") else a - b if subtract else a + b))
    scores = final_answer([r["prompt"] for r in rows], [r["completion"] for r in rows], answer=answers)
    assert scores == [1.0] * len(rows)


@pytest.mark.parametrize("name", ["prompts_train.jsonl", "prompts_eval.jsonl"])
def test_prompt_rows_carry_their_answer(name: str):
    rows = _rows(name)
    assert rows and all(set(r) == {"prompt", "answer"} for r in rows)
    for row in rows:
        problem = task.parse_prompt(row["prompt"])
        assert problem is not None and row["answer"] == str(task.result(problem))
        assert task.correctness(row["prompt"], f"The answer is {row['answer']}.") == 1.0


def test_problems_are_carry_free_two_digit_sums_and_differences():
    problems = task.problems()
    assert {op for _, op, _ in problems} == {"+", "-"}
    for a, op, b in problems:
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert 0 <= task.result((a, op, b)) <= 99
    assert task.carry_free((23, "+", 45)) and task.carry_free((98, "-", 45))
    assert not task.carry_free((27, "+", 45)) and not task.carry_free((93, "-", 45))
    assert not task.carry_free((60, "+", 50)) and not task.carry_free((45, "-", 50))


def test_correctness_judge():
    assert task.correctness("What is 23 + 45?", "23 + 45 = 68. The answer is 68.") == 1.0
    assert task.correctness("Subtract 12 from 45.", "45 - 12 = 33. The answer is 33.") == 1.0
    assert task.correctness("What is 23 + 45?", "23 + 45 = 67. The answer is 67.") == 0.0
    assert task.correctness("Not a task prompt", "The answer is 1.") == 0.0
