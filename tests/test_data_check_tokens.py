"""``aligner data check`` shows the first rows of each source as tokens: which are prompt, which are trained on."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from aligner.cli import main
from aligner.data.check import check_data
from tests.conftest import tiny_model, write_jsonl


def _config(tmp_path: Path, rows: list[dict], loss: str = "dpo", **stage: object) -> Path:
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "template": "plain", "max_length": 48}
    config = {"output_dir": str(tmp_path / "run"), "model": tiny_model(), "tokenizer": "builtin",
              "stages": [{"name": "s", "data": data, "losses": [{"name": loss}], **stage}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


PAIR = {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."}


def test_preference_rows_show_both_completions_with_the_prompt_bracketed(tmp_path, capsys):
    path = _config(tmp_path, [PAIR, {"prompt": "Hi", "chosen": "Hello there", "rejected": "Go away"},
                              {"prompt": "Say", "chosen": "yes", "rejected": "no"}])
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    data = tmp_path / "train.jsonl"
    # The plain template's separating space merges into the completion's first word (" I"): that
    # token is trained on, and the prompt a generation continues from ends at "?".
    assert f"    {data}, line 1 chosen: [What| is| |2|+|2|?] I|t| is| |4|.|</s>\n" in out
    assert f"    {data}, line 1 rejected: [What| is| |2|+|2|?] I|t| is| |5|.|</s>\n" in out
    assert f"    {data}, line 2 chosen: [H|i| ]H|ell|o| there|</s>\n" in out
    assert "line 3" not in out  # two rows per source by default
    assert "tokens of the first 2 rows of each source" in out


def test_json_gives_each_token_string_with_a_trained_flag(tmp_path, capsys):
    path = _config(tmp_path, [{"prompt": "Hi", "completion": "Hello there"}], loss="sft")
    assert main(["data", "check", str(path), "--json", "--show-tokens", "1"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    (view,) = report["token_views"]
    assert view["completion"] == "completion" and view["dropped"] is None
    assert [(t["text"], t["trained"]) for t in view["tokens"]] == [
        ("H", False), ("i", False), (" ", False), ("H", True), ("ell", True), ("o", True), (" there", True),
        ("</s>", True)]


def test_show_tokens_chooses_how_many_rows_and_zero_shows_none(tmp_path):
    rows = [{"prompt": f"Q{i}", "completion": "A"} for i in range(5)]
    path = _config(tmp_path, rows, loss="sft")
    (three,) = check_data(path, show_tokens=3)
    assert [v.location.rsplit(" ", 1)[-1] for v in three.token_views] == ["1", "2", "3"]
    (none,) = check_data(path, show_tokens=0)
    assert none.token_views == []


def test_a_dropped_row_says_why_instead_of_tokens(tmp_path, capsys):
    path = _config(tmp_path, [{**PAIR, "chosen": "  "}, PAIR])
    main(["data", "check", str(path)])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'train.jsonl'}, line 1 (chosen): dropped, empty chosen" in out


def test_prompt_only_rows_show_the_prompt_with_nothing_trained(tmp_path):
    rows = [{"prompt": "What is 2+2?"}, {"prompt": "Hi"}]
    path = _config(tmp_path, rows, loss="grpo", algorithm={"name": "grpo", "judge": {"name": "rule", "regex": "4"},
                                                           "max_new_tokens": 8})
    (report,) = check_data(path, show_tokens=1)
    (view,) = report.token_views
    assert view.completion is None
    assert not any(trained for _, _, trained in view.tokens)
    # The rendered prompt's trailing space stays a prompt token here: the builtin vocabulary does
    # not merge it into the probe answers' first tokens (aligner.data.tokenize.PROBES).
    assert view.render() == (f"{tmp_path / 'train.jsonl'}, line 1 prompt: [What| is| |2|+|2|?| ]"
                             "  (prompt only: completions are generated in training)")
