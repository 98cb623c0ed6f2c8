"""Data: formats, validation with file/line/field, templates, truncation, masks and batching."""

from __future__ import annotations

import json

import pytest

from aligner.data.batching import LengthGroupedBatches, collate
from aligner.data.loading import load_validated
from aligner.data.templates import available_templates, load_template
from aligner.data.tokenize import tokenize_rows
from aligner.errors import DataError
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return load_builtin_tokenizer()


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError) as err:
        load_validated(path, None)
    assert str(err.value).startswith(f"{path}, line 3: missing field 'rejected'")


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_validated(path, None)


def test_wrong_types_and_bad_labels_are_located(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                             {"prompt": "a", "completion": "b", "label": "maybe"}])
    with pytest.raises(DataError, match=r"line 2: field 'label' must be true or false"):
        load_validated(path, None)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": 3, "completion": "b"}])
    with pytest.raises(DataError, match=r"line 1: field 'prompt' must be a string or a list of messages"):
        load_validated(path, None)


@pytest.mark.parametrize("row,fmt", [
    ({"prompt": "a", "completion": "b"}, "sft"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "sft"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
    ({"prompt": "a", "completion": "b", "label": False}, "unpaired"),
    ({"prompt": "a"}, "prompt"),
])
def test_formats_are_detected(tmp_path, row, fmt):
    detected, rows = load_validated(write_jsonl(tmp_path / "d.jsonl", [row]), None)
    assert detected == fmt
    assert set(rows[0].data) >= {"prompt"}


def test_implicit_prompt_chat_pairs_are_split(tmp_path):
    shared = [{"role": "user", "content": "hi"}]
    row = {"chosen": shared + [{"role": "assistant", "content": "hello"}],
           "rejected": shared + [{"role": "assistant", "content": "go away"}]}
    _, rows = load_validated(write_jsonl(tmp_path / "hh.jsonl", [row]), None)
    assert rows[0].data["prompt"] == shared
    assert rows[0].data["chosen"] == [{"role": "assistant", "content": "hello"}]


def test_csv_parquet_and_save_to_disk_load_through_datasets(tmp_path):
    import datasets

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in ("d.csv", "d.parquet", "saved"):
        fmt, loaded = load_validated(tmp_path / source, None)
        assert fmt == "preference" and [r.data for r in loaded] == rows
    bad = datasets.Dataset.from_list([rows[0], {"prompt": "x", "chosen": "y", "rejected": None}])
    bad.to_csv(str(tmp_path / "bad.csv"), index=False)
    with pytest.raises(DataError, match=r"bad.csv, line 3: missing field 'rejected'"):
        load_validated(tmp_path / "bad.csv", None)


def test_alpaca_and_chatml_templates_render(tokenizer):
    alpaca = load_template("alpaca", tokenizer, chat_data=False)
    text = alpaca.prompt_text("Say hi.")
    assert "### Instruction:\nSay hi.\n\n### Response:\n" in text
    assert alpaca.completion_text("Hi!") == "Hi!</s>"
    chatml = load_template("chatml", tokenizer, chat_data=True)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    assert chatml.prompt_text(messages) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert chatml.completion_text("Hi") == "Hi<|im_end|>\n"
    assert {"alpaca", "chatml", "plain", "tokenizer"} <= set(available_templates())


def test_chat_data_without_any_template_lists_the_available_ones(tokenizer):
    with pytest.raises(DataError, match=r"no chat template; set data.template to one of: .*alpaca.*chatml"):
        load_template("auto", tokenizer, chat_data=True)


def test_tokenizer_chat_template_is_used_when_present(tmp_path):
    tok = load_builtin_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    template = load_template("auto", tok, chat_data=True)
    assert template.prompt_text([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    assert template.completion_text("yo") == "yo</s>"


def test_completion_mask_covers_exactly_the_completion(tmp_path, tokenizer):
    _, rows = load_validated(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Describe the red cat.", "chosen": "The red cat is kind.", "rejected": "Bad."}]), None)
    template = load_template("plain", tokenizer, chat_data=False)
    data = tokenize_rows(rows, "preference", tokenizer, template, max_length=64, max_prompt_length=32)
    example = data.examples[0]
    batch = collate(data.examples, "preference", tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # chosen then rejected
    chosen_mask = batch["completion_mask"][0]
    assert chosen_mask.sum() == len(example["chosen_ids"])
    assert batch["input_ids"][0][chosen_mask.bool()].tolist() == example["chosen_ids"]
    assert tokenizer.decode(example["chosen_ids"]) == "The red cat is kind.</s>"
    assert batch["attention_mask"][1].sum() == len(example["prompt_ids"]) + len(example["rejected_ids"])


def test_truncation_cuts_prompt_from_the_left_and_drops_emptied_rows(tmp_path, tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    rows = [{"prompt": long_prompt, "completion": "The end."}, {"prompt": "Hi.", "completion": "   "},
            {"prompt": "Hi.", "completion": "Fine."}]
    _, loaded = load_validated(write_jsonl(tmp_path / "s.jsonl", rows), None)
    template = load_template("plain", tokenizer, chat_data=False)
    data = tokenize_rows(loaded, "sft", tokenizer, template, max_length=16, max_prompt_length=8)
    assert data.dropped == {"empty completion": 1}
    kept = data.examples[0]
    assert len(kept["prompt_ids"]) == 8
    assert tokenizer.decode(kept["prompt_ids"]).endswith("word59 ")  # the end of the prompt survives
    assert tokenizer.decode(kept["completion_ids"]) == "The end.</s>"
    # A prompt that fills max_length leaves no room: the row is dropped and counted, never trained on.
    tight = tokenize_rows(loaded, "sft", tokenizer, template, max_length=8, max_prompt_length=8)
    assert tight.dropped["no completion tokens left after truncation"] == 1


def test_length_grouped_batches_cover_everything_once_and_reduce_padding():
    lengths = [1, 50, 2, 49, 3, 48, 4, 47] * 8
    grouped = LengthGroupedBatches(lengths, batch_size=4, seed=0).batches()
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    plain = LengthGroupedBatches(lengths, batch_size=4, seed=0, group_by_length=False).batches()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 4
    again = LengthGroupedBatches(lengths, batch_size=4, seed=0)
    assert again.batches() == grouped
    again.set_epoch(1)
    assert again.batches() != grouped


def test_jsonl_rows_keep_unicode(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "日本語?", "completion": "はい"}, ensure_ascii=False) + "\n")
    _, rows = load_validated(path, None)
    assert rows[0].data["completion"] == "はい"
