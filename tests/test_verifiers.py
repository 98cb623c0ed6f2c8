"""The built-in reward functions (``aligner.online.verifiers``) against hand-written expectations."""

from __future__ import annotations

from fractions import Fraction

import pytest

from aligner.online.verifiers import (
    extract_final_answer,
    final_answer,
    format_regex,
    length_penalty,
    parse_number,
)


def _one(completion: str, answer: object) -> float | None:
    return final_answer(["q"], [completion], answer=[answer])[0]


@pytest.mark.parametrize("text, expected", [
    ("23 + 45 = 68. The answer is 68.", 68),
    ("The answer is 68. Check: 23 + 45 = 68 + 0 = 68, not 70.", 68),  # the marker wins over the last number
    ("#### 72", 72),
    ("Answer: 1/2", Fraction(1, 2)),
    ("answer is: $1,234.", 1234),
    ("We get 5 and then 7", 7),  # no marker: the last number
    ("x = -22", -22),
    ("x = \u22123", -3),  # unicode minus sign
    ("68-23", 23),  # a hyphen between numbers is an operator, not a sign
    ("so .50 of it", Fraction(1, 2)),
    ("1,234 apples", 1234),
    ("1,2,3,4", 4),  # commas outside thousands groups separate numbers
    ("The answer is 1,23", 1),
    ("1,2345", 2345),
    ("The answer is 5. Hmm, the answer is", 5),  # a trailing marker with no number after it
    ("nothing here", None),
    ("", None),
    ("3/0", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    (" 1,234 ", 1234),
    ("+68.", 68),
    ("\u22123", -3),
    (".50", Fraction(1, 2)),
    ("1/2", Fraction(1, 2)),
    ("0.5", Fraction(1, 2)),
    ("- 3", -3),
    (3, 3),
    (0.1, Fraction(1, 10)),
    ("abc", None),
    (True, None),
    ("1/0", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("completion, answer", [
    ("The answer is 0.5", "1/2"),
    ("The answer is 1/2", ".50"),
    ("The answer is .50", 0.5),
    ("The answer is -3", "\u22123"),
    ("The answer is \u22123.", "-3"),
    ("The answer is 1,234.", "1234"),
    ("The answer is 1234", " 1,234 "),
    ("The answer is +68", "68."),
    ("23 + 45 = 68. The answer is 68.0", 68),
    ("The answer is 68", "The answer is 68."),  # a reference written as a solution is read like one
    ("The answer is 72.", "She sold 48 / 2 = 24 more, 48 + 24 = 72. #### 72"),
])
def test_final_answer_matches_equal_numbers(completion, answer):
    assert _one(completion, answer) == 1.0


@pytest.mark.parametrize("completion, answer", [
    ("The answer is 67.", "68"),
    ("The answer is 68.5", "68"),
    ("The answer is 3", "-3"),
    ("The answer is 1,23", "123"),  # "1,23" is not a thousands group: the answer is 1
    ("no number at all", "68"),
    ("", "68"),
    ("The answer is 68 ... wait, Answer: 86", "68"),  # the last marker counts
])
def test_final_answer_rejects_other_numbers(completion, answer):
    assert _one(completion, answer) == 0.0


def test_final_answer_is_none_where_there_is_no_answer():
    completions = ["The answer is 1.", "The answer is 2.", "The answer is 3.", "The answer is 4."]
    assert final_answer(["a", "b", "c", "d"], completions, answer=["1", None, "", "5"]) == [1.0, None, None, 0.0]
    # No answer column at all: nothing applies.
    assert final_answer(["a", "b"], completions[:2]) == [None, None]


def test_final_answer_never_raises_on_odd_completions():
    odd = ["", "   ", "\u2212", "1/0", "#### ", "Answer:", ".", "-", "2,3,4", "\x00\ufffd", "9" * 500]
    assert final_answer(["q"] * len(odd), odd, answer=["1"] * len(odd)) == [0.0] * len(odd)


def test_final_answer_rejects_a_reference_without_a_number():
    with pytest.raises(ValueError, match="'answer' of sample 1 .*'yes'"):
        final_answer(["a", "b"], ["1", "2"], answer=["1", "yes"])


def test_final_answer_rejects_misaligned_columns():
    with pytest.raises(ValueError, match="'answer' has 1 values for 2 completions"):
        final_answer(["a", "b"], ["1", "2"], answer=["1"])


def test_format_regex():
    pattern = r"\d+ [+-] \d+ = \d+\. The answer is \d+\."
    completions = ["23 + 45 = 68. The answer is 68.", "  23 + 45 = 68. The answer is 68.\n",
                   "23 + 45 = 68.", "The answer is 68. 23 + 45 = 68. The answer is 68.", ""]
    assert format_regex(["q"] * 5, completions, pattern=pattern) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # DOTALL: "." crosses newlines, and the match must cover the whole (stripped) completion.
    assert format_regex(["q", "q"], ["<think>a\nb</think> 5", "x <think>a</think> 5"],
                        pattern=r"<think>.*</think> \d+") == [1.0, 0.0]


def test_format_regex_names_a_bad_pattern():
    with pytest.raises(ValueError, match=r"invalid pattern '\(unclosed'"):
        format_regex(["q"], ["x"], pattern="(unclosed")
    with pytest.raises(ValueError, match="'pattern' must be a string"):
        format_regex(["q"], ["x"], pattern=None)


def test_length_penalty_is_dapo_soft_overlong_penalty():
    # max_tokens 10, buffer 4: free up to 6 tokens, then -0.25 per token, -1 from 10 tokens on.
    lengths = [0, 3, 6, 7, 8, 9, 10, 14]
    ids = [[1] * n for n in lengths]
    rewards = length_penalty(["q"] * len(ids), ["c"] * len(ids), ids, max_tokens=10, buffer=4)
    assert rewards == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    scaled = length_penalty(["q"] * 3, ["c"] * 3, [[1] * 6, [1] * 8, [1] * 20], max_tokens=10, buffer=4, penalty=0.5)
    assert scaled == [0.0, -0.25, -0.5]
    # buffer == max_tokens: the penalty grows from the first token.
    assert length_penalty(["q"] * 2, ["c"] * 2, [[1], [1, 1]], max_tokens=2, buffer=2) == [-0.5, -1.0]


@pytest.mark.parametrize("options, message", [
    ({"max_tokens": 10, "buffer": 0}, "'buffer' must be between 1 and max_tokens"),
    ({"max_tokens": 10, "buffer": 11}, "'buffer' must be between 1 and max_tokens"),
    ({"max_tokens": 0, "buffer": 1}, "'max_tokens' must be at least 1"),
    ({"max_tokens": 10.5, "buffer": 2}, "'max_tokens' must be an integer"),
    ({"max_tokens": 10, "buffer": 2, "penalty": -1}, "'penalty' must be a number >= 0"),
])
def test_length_penalty_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        length_penalty(["q"], ["c"], [[1]], **options)


def test_length_penalty_needs_completion_ids():
    with pytest.raises(ValueError, match="needs 'completion_ids'"):
        length_penalty(["q"], ["c"], None, max_tokens=10, buffer=2)
    with pytest.raises(ValueError, match="'completion_ids' has 1 values for 2 completions"):
        length_penalty(["q", "q"], ["c", "c"], [[1]], max_tokens=10, buffer=2)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_every_function_returns_one_value_per_completion(size):
    prompts, completions = ["What is 1 + 1?"] * size, ["1 + 1 = 2. The answer is 2."] * size
    ids = [[5, 6, 7]] * size
    # The TRL convention: every prompt column arrives as a keyword, plus the source's options.
    columns = {"answer": ["2"] * size, "source": ["x"] * size}
    assert len(final_answer(prompts, completions, completion_ids=ids, **columns)) == size
    assert len(format_regex(prompts, completions, completion_ids=ids, pattern=".*", **columns)) == size
    assert len(length_penalty(prompts, completions, ids, max_tokens=4, buffer=2, **columns)) == size
