"""Tokenizer faults: no pad token (chosen explicitly, said so, masked), chat data without any template."""

from __future__ import annotations

import yaml

from aligner.cli import main
from aligner.config import load_config
from aligner.data.batching import collate
from aligner.data.loading import Row
from aligner.data.templates import load_template
from aligner.data.tokenize import tokenize_rows
from aligner.errors import ConfigError
from aligner.modeling.loading import load_tokenizer
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
from tests.conftest import write_jsonl


def _saved_without_pad(tmp_path, eos: bool = True):
    tokenizer = load_builtin_tokenizer()
    tokenizer.pad_token = None
    if not eos:
        tokenizer.eos_token = None
    directory = tmp_path / "tok"
    tokenizer.save_pretrained(directory)
    return directory


def _config(make_config, tokenizer_dir):
    config = make_config("sft")
    config["tokenizer"] = str(tokenizer_dir)
    return load_config(config)


def test_a_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, make_config, caplog):
    directory = _saved_without_pad(tmp_path)
    with caplog.at_level("WARNING", logger="aligner"):
        tokenizer = load_tokenizer(_config(make_config, directory))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert "tokenizer has no pad token; padding with the EOS token '</s>'" in caplog.text
    # Padding with EOS must not mask the EOS the completion ends with: masks come from lengths, not ids.
    template = load_template("plain", tokenizer, chat_data=False)
    rows = [Row({"prompt": "Hi", "completion": "The red car is kind."}, "x, line 1"),
            Row({"prompt": "Describe the small blue house please", "completion": "ok"}, "x, line 2")]
    data = tokenize_rows(rows, "sft", tokenizer, template, max_length=64, max_prompt_length=32)
    batch = collate(data.examples, "sft", tokenizer.pad_token_id)
    for i, example in enumerate(data.examples):
        n_prompt, n_completion = len(example["prompt_ids"]), len(example["completion_ids"])
        assert example["completion_ids"][-1] == tokenizer.eos_token_id
        assert batch["attention_mask"][i].sum() == n_prompt + n_completion
        assert batch["completion_mask"][i].tolist()[n_prompt:n_prompt + n_completion] == [1] * n_completion
        assert batch["completion_mask"][i].sum() == n_completion


def test_a_tokenizer_without_pad_or_eos_is_an_error(tmp_path, make_config):
    directory = _saved_without_pad(tmp_path, eos=False)
    try:
        load_tokenizer(_config(make_config, directory))
    except ConfigError as exc:
        assert "has neither a pad nor an EOS token" in str(exc) and str(directory) in str(exc)
    else:
        raise AssertionError("expected a ConfigError")


def test_chat_data_without_any_template_lists_the_available_ones(tmp_path, make_config, capsys):
    chat = [{"messages": [{"role": "user", "content": f"Describe thing {i}."},
                          {"role": "assistant", "content": "It is kind."}]} for i in range(8)]
    config = make_config("sft")
    config["stages"][0]["data"]["train"] = str(write_jsonl(tmp_path / "chat.jsonl", chat))
    config["stages"][0]["data"]["template"] = "auto"  # the builtin tokenizer has no chat template
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert "stage 'sft' ('stages[0].data.template')" in err
    assert "chat format but the tokenizer has no chat template" in err
    assert "set data.template to one of: alpaca, chatml, plain" in err
    # With one of the listed templates the same data is accepted.
    assert main(["data", "check", str(path), "stages.sft.data.template=chatml"]) == 0
