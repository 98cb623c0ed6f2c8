"""Dataset layouts people bring (Alpaca, ShareGPT, OpenAI messages, HH-RLHF, UltraFeedback) -> aligner rows."""

from __future__ import annotations

import pytest

from aligner.config import SourceConfig
from aligner.data.batching import collate
from aligner.data.loading import SourceReport, load_validated
from aligner.data.templates import load_template
from aligner.data.tokenize import tokenize_rows
from aligner.errors import DataError
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

from .conftest import write_jsonl

USER = {"role": "user", "content": "What is 2+2?"}
REPLY = {"role": "assistant", "content": "It is 4."}
WRONG = {"role": "assistant", "content": "It is 5."}


@pytest.fixture(scope="module")
def tokenizer():
    return load_builtin_tokenizer()


def load(tmp_path, rows, source_format=None, data_format=None):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    source = SourceConfig(path=str(path), format=source_format) if source_format else path
    reports: list[SourceReport] = []
    fmt, loaded = load_validated(source, data_format, sources=reports)
    return fmt, [r.data for r in loaded], reports[0]


def test_alpaca_rows_become_prompt_and_completion(tmp_path):
    fmt, rows, report = load(tmp_path, [
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])
    assert fmt == "sft" and report.layout == "alpaca"
    assert rows == [{"prompt": "Add the numbers.\n\n2 and 2", "completion": "4"},
                    {"prompt": "Say hi.", "completion": "Hi!"}]


def test_sharegpt_conversations_become_chat_messages(tmp_path):
    fmt, rows, report = load(tmp_path, [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "It is 4."}]}])
    assert fmt == "sft" and report.layout == "sharegpt"
    assert rows == [{"prompt": [{"role": "system", "content": "Be brief."}, USER], "completion": [REPLY]}]


def test_sharegpt_unknown_role_and_trailing_user_turn_are_located(tmp_path):
    with pytest.raises(DataError, match=r"rows.jsonl, line 1: field 'conversations' turn 1 has unknown 'from' 'bot'"):
        load(tmp_path, [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}])
    with pytest.raises(DataError, match=r"line 1: field 'conversations' must end with an assistant message"):
        load(tmp_path, [{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}])


def test_openai_messages_last_assistant_turn_is_the_completion(tmp_path):
    fmt, rows, report = load(tmp_path, [{"messages": [USER, REPLY, USER, REPLY]}])
    assert fmt == "sft" and report.layout == "openai"
    assert rows == [{"prompt": [USER, REPLY, USER], "completion": [REPLY]}]


def test_hh_rlhf_shared_prefix_is_the_prompt(tmp_path):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    fmt, rows, report = load(tmp_path, [{"chosen": dialogue + " It is 4.", "rejected": dialogue + " It is 5."}])
    assert fmt == "preference" and report.layout == "hh-rlhf"
    assert rows == [{"prompt": dialogue, "chosen": "It is 4.", "rejected": "It is 5."}]


def test_hh_rlhf_with_the_plain_template_reads_as_the_dialogue_with_one_space_after_the_marker(tmp_path):
    from aligner.data.templates import load_template
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    dialogue = "\n\nHuman: What is 2+2?\n\nAssistant:"
    _, rows, _ = load(tmp_path, [{"chosen": dialogue + " It is 4.", "rejected": dialogue + " It is 5."}])
    template = load_template("plain", load_builtin_tokenizer(), chat_data=False)
    text = template.prompt_text(rows[0]["prompt"]) + rows[0]["chosen"]
    assert text == dialogue + " It is 4."  # not "Assistant:  It is 4." (the space twice)


def test_hh_rlhf_replies_sharing_their_first_words_split_at_the_last_assistant_marker(tmp_path):
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant:"
    _, rows, _ = load(tmp_path, [{"chosen": prompt + " It is 4.", "rejected": prompt + " It is 5."}], "hh-rlhf")
    assert rows[0]["prompt"] == prompt
    with pytest.raises(DataError, match=r"line 1: 'chosen' and 'rejected' share no text ending in"):
        load(tmp_path, [{"chosen": "A", "rejected": "B"}], "hh-rlhf")


def test_ultrafeedback_repeated_prompt_turn_is_removed(tmp_path):
    fmt, rows, report = load(tmp_path, [{"prompt": "What is 2+2?", "chosen": [USER, REPLY],
                                         "rejected": [USER, WRONG], "score_chosen": 9.0}])
    assert fmt == "preference" and report.layout == "ultrafeedback"
    assert rows == [{"prompt": [USER], "chosen": [REPLY], "rejected": [WRONG]}]


def test_ultrafeedback_row_not_starting_with_the_prompt_is_a_located_error(tmp_path):
    other = {"role": "user", "content": "Something else"}
    rows = [{"prompt": "What is 2+2?", "chosen": [USER, REPLY], "rejected": [USER, WRONG]},
            {"prompt": "What is 2+2?", "chosen": [USER, REPLY], "rejected": [other, WRONG]}]
    with pytest.raises(DataError, match=r"rows.jsonl, line 2: field 'rejected' does not start with the prompt turn"):
        load(tmp_path, rows)


def test_a_completion_opening_with_a_user_turn_is_never_trained(tmp_path):
    # Declared as aligner's own preference rows, the UltraFeedback layout would train the user's turn.
    row = {"prompt": "What is 2+2?", "chosen": [USER, REPLY], "rejected": [USER, WRONG]}
    with pytest.raises(DataError, match=r"line 1: field 'chosen' starts with a user message"):
        load(tmp_path, [row], source_format="preference")


def test_ultrafeedback_completion_mask_covers_only_the_reply(tmp_path, tokenizer):
    _, rows = load_validated(write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "What is 2+2?", "chosen": [USER, REPLY], "rejected": [USER, WRONG]}]), None)
    template = load_template("chatml", tokenizer, chat_data=True)
    data = tokenize_rows(rows, "preference", tokenizer, template, max_length=128, max_prompt_length=64)
    example = data.examples[0]
    batch = collate(data.examples, "preference", tokenizer.pad_token_id)
    chosen = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert chosen == example["chosen_ids"]
    # Exactly the assistant reply is trained; the user's turn is prompt (never 'What is 2+2?It is 4.').
    assert tokenizer.decode(chosen) == "It is 4.<|im_end|>\n"
    assert tokenizer.decode(example["prompt_ids"]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    rejected = batch["input_ids"][1][batch["completion_mask"][1].bool()].tolist()
    assert tokenizer.decode(rejected) == "It is 5.<|im_end|>\n"


def test_declared_converter_must_fit_the_data_format(tmp_path):
    with pytest.raises(DataError, match=r"alpaca rows are sft rows, but this data is read as preference rows"):
        load(tmp_path, [{"instruction": "a", "output": "b"}], source_format="alpaca", data_format="preference")


def test_own_formats_are_not_taken_for_a_layout(tmp_path):
    fmt, rows, report = load(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert (fmt, report.layout) == ("preference", "native")
    assert rows == [{"prompt": "a", "chosen": "b", "rejected": "c"}]


HH = "\n\nHuman: What is 2+2?\n\nAssistant:"


@pytest.mark.parametrize("row,fmt,trained", [
    ({"instruction": "Add.", "input": "2 and 2", "output": "4"}, "sft", {"completion": "4<|im_end|>\n"}),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "sft",
     {"completion": "Hello<|im_end|>\n"}),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "sft",
     {"completion": "Hello<|im_end|>\n"}),
    ({"chosen": HH + " It is 4.", "rejected": HH + " It is 5."}, "preference",
     {"chosen": "It is 4.<|im_end|>\n", "rejected": "It is 5.<|im_end|>\n"}),  # the space after "Assistant:" is the template's
])
def test_each_layout_trains_exactly_its_completion_tokens(tmp_path, tokenizer, row, fmt, trained):
    detected, rows = load_validated(write_jsonl(tmp_path / "rows.jsonl", [row]), None)
    assert detected == fmt
    template = load_template("chatml", tokenizer, chat_data=True)
    data = tokenize_rows(rows, fmt, tokenizer, template, max_length=128, max_prompt_length=64)
    batch = collate(data.examples, fmt, tokenizer.pad_token_id)
    for i, (field, text) in enumerate(trained.items()):
        ids = batch["input_ids"][i][batch["completion_mask"][i].bool()].tolist()
        assert ids == data.examples[0][field + "_ids"]
        assert tokenizer.decode(ids) == text
        prompt = batch["input_ids"][i][batch["attention_mask"][i].bool() & ~batch["completion_mask"][i].bool()]
        assert tokenizer.decode(prompt.tolist()).endswith("<|im_start|>assistant\n")
