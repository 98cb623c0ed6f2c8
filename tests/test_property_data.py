"""Property-based: random and malformed rows through validate -> tokenize -> collate.

Every row is either accepted, and then its masks are exactly right, or rejected with a DataError
that names its file and line and the field at fault. Nothing else may escape.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aligner.data.batching import collate
from aligner.data.formats import ROLES, validate_row
from aligner.data.loading import Row, load_validated
from aligner.data.templates import load_template
from aligner.data.tokenize import COMPLETION_FIELDS, tokenize_rows
from aligner.errors import DataError
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED

TOKENIZER = load_builtin_tokenizer()
TEMPLATE = load_template("chatml", TOKENIZER, chat_data=True)
FIELDS = ("prompt", "completion", "chosen", "rejected", "label", "messages")
NAMES_A_FIELD = re.compile(r"'(prompt|completion|chosen|rejected|label|messages)'")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(max_size=40)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from((*ROLES, "bot")), "content": st.one_of(text, st.integers())}),
    st.fixed_dictionaries({"role": st.just("user")}),
    text,
)
messages = st.lists(message, max_size=4)
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text}), min_size=1, max_size=3)
value = st.one_of(text, st.sampled_from(["", "   ", "\n"]), st.none(), st.integers(), st.booleans(), st.floats(),
                  messages, good_messages, st.sampled_from(["true", "False", "yes", 0, 1, 2]),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
random_rows = st.dictionaries(st.sampled_from((*FIELDS, "extra")), value, max_size=6)
# Rows with every field of every format well formed (each format takes the fields it needs), and
# the same with one field replaced by anything: most then pass validation and reach collate.
completion = st.one_of(text, good_messages)
well_formed = st.fixed_dictionaries({"prompt": st.one_of(text.filter(str.strip), good_messages),
                                     "completion": completion, "chosen": completion, "rejected": completion,
                                     "label": st.booleans()})
one_field_off = st.tuples(well_formed, st.sampled_from(FIELDS), value).map(lambda t: {**t[0], t[1]: t[2]})
rows = st.one_of(random_rows, well_formed, well_formed, one_field_off)
formats = st.sampled_from([SFT, PREFERENCE, UNPAIRED, PROMPT_ONLY])


def check_batch(examples: list[dict], data_format: str, max_length: int, max_prompt_length: int) -> None:
    """Masks, padding and lengths of a collated batch against the examples they came from."""
    batch = collate(examples, data_format, pad_token_id=TOKENIZER.pad_token_id)
    fields = [f + "_ids" for f in COMPLETION_FIELDS[data_format]] or [None]
    sequences = [(e["prompt_ids"], e[f] if f else []) for f in fields for e in examples]
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape[0] == len(sequences)
    assert batch["row_ids"].tolist() == [e["row_id"] for e in examples]
    for i, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        pad = width - n
        assert len(prompt) <= max_prompt_length
        if data_format != PROMPT_ONLY:
            assert completion, "a kept row always has completion tokens"
            assert n <= max_length
        assert batch["input_ids"][i].tolist() == prompt + completion + [TOKENIZER.pad_token_id] * pad
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * pad
        assert batch["completion_mask"][i].tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * pad
        assert batch["prompt_lengths"][i] == len(prompt)
    if data_format == UNPAIRED:
        assert batch["labels"].tolist() == [e["label"] for e in examples]


@SETTINGS
@given(raw_rows=st.lists(rows, min_size=1, max_size=6), data_format=formats,
       max_length=st.integers(2, 48), max_prompt_length=st.integers(1, 32))
def test_rows_are_accepted_with_correct_masks_or_rejected_with_a_location(raw_rows, data_format, max_length,
                                                                          max_prompt_length):
    valid = []
    for line, raw in enumerate(raw_rows, start=1):
        location = f"data.jsonl, line {line}"
        try:
            clean = validate_row(raw, data_format, location)
        except DataError as exc:
            message = str(exc)
            assert message.startswith(f"{location}: "), message
            assert NAMES_A_FIELD.search(message), message
            continue
        fields = {*COMPLETION_FIELDS[data_format], "prompt", *(["label"] if data_format == UNPAIRED else [])}
        # Prompt-only rows keep their other columns (reward functions read them, e.g. an answer).
        assert set(clean) == (fields | set(raw) if data_format == PROMPT_ONLY else fields)
        valid.append(Row(clean, location))
    tokenized = tokenize_rows(valid, data_format, TOKENIZER, TEMPLATE, max_length, max_prompt_length)
    assert len(tokenized.examples) + sum(tokenized.dropped.values()) == len(valid)
    assert len(tokenized.dropped_rows) == sum(tokenized.dropped.values())
    assert len(tokenized.full_lengths) == len(valid)
    if data_format == PREFERENCE:
        assert all(e["chosen_ids"] != e["rejected_ids"] for e in tokenized.examples)
    event(f"{data_format}: {len(valid)} valid, {len(tokenized.examples)} kept")
    if tokenized.examples:
        event("batch checked")
        check_batch(tokenized.examples, data_format, max_length, max_prompt_length)


lines = st.one_of(rows.map(json.dumps), text, st.sampled_from(["[1, 2]", "null", "{", '"s"', "   "]))


@SETTINGS
@given(file_lines=st.lists(lines, min_size=1, max_size=8), data_format=st.one_of(st.none(), formats))
def test_files_fail_at_a_located_line_and_collecting_finds_the_same_first_error(file_lines, data_format):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "data.jsonl"
        # json.dumps escapes newlines; raw text lines may hold some, which then split into more lines.
        path.write_text("\n".join(file_lines) + "\n", encoding="utf-8")
        numbered = [n for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1) if line.strip()]
        rejected = []
        try:
            fmt, kept = load_validated(path, data_format, collect_errors=rejected)
        except DataError as exc:
            fmt, kept, collected_error = None, [], str(exc)
        else:
            collected_error = None
        for bad in rejected:
            assert re.fullmatch(rf"{re.escape(str(path))}, line \d+", bad.location)
            assert bad.message.startswith(bad.location + ": ")
        try:
            strict = load_validated(path, data_format)
        except DataError as exc:
            message = str(exc)
            assert message.startswith(str(path))
            # The strict path stops at the first problem the collecting path found.
            assert message == (rejected[0].message if rejected else collected_error)
        else:
            assert not rejected and collected_error is None
            assert strict[0] == fmt and [r.data for r in strict[1]] == [r.data for r in kept]
        event(f"kept {bool(kept)}, rejected {bool(rejected)}")
        if collected_error is None:
            # Each non-blank line is either kept or rejected, never lost.
            assert len(kept) + len(rejected) == len(numbered)
