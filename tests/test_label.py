"""``aligner label``: sampled completions judged into preference rows (with provenance), resumable,
and good enough that DPO on them raises held-out preference accuracy on the quickstart task."""

from __future__ import annotations

import json

import pytest
import torch

from aligner.cli import main
from aligner.commands.label import label, load_label_config, preference_of

from .conftest import write_jsonl
from .quickstart_sft import quickstart_rows as _rows
from .quickstart_sft import train_sft_model

JUDGE = {"name": "rule", "callable": "aligner.quickstart.task:behaviour_score"}
def test_preference_of_picks_best_and_worst_and_reports_ties():
    assert preference_of([0.2, 0.9, 0.1, 0.5]) == (1, 2)
    assert preference_of([1.0, 1.0]) is None
    # float noise in a judge's probabilities is not a preference
    assert preference_of([0.9999999403953552, 1.0000000596046448], min_margin=1e-6) is None


@torch.no_grad()
def _preference_accuracy(model_dir: str, rows: list[dict]) -> float:
    """Share of held-out pairs whose chosen answer the model finds likelier than the rejected one."""
    from transformers import AutoModelForCausalLM

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logp(prompt: str, completion: str) -> float:
        prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt + " ", add_special_tokens=False)["input_ids"]]
        ids = prompt_ids + tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(ids[1:])
        return logits[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()

    wins = [logp(r["prompt"], r["chosen"]) > logp(r["prompt"], r["rejected"]) for r in rows]
    return sum(wins) / len(wins)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> str:
    """A small SFT'd quickstart model, trained once for this module."""
    return train_sft_model(tmp_path_factory.mktemp("sft"))


def test_label_then_dpo_improves_held_out_preference_accuracy(sft_model, tmp_path):
    from aligner.api import train

    prompts = write_jsonl(tmp_path / "prompts.jsonl", _rows("prompts_train.jsonl", 96))
    output = tmp_path / "labelled.jsonl"
    config = {"output": str(output), "model": {"path": sft_model}, "tokenizer": "builtin", "prompts": str(prompts),
              "judge": JUDGE, "num_completions": 4, "max_new_tokens": 12, "batch_size": 32}
    (tmp_path / "label.yaml").write_text(json.dumps(config))
    assert main(["label", str(tmp_path / "label.yaml")]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    ties = output.with_name(output.name + ".ties.jsonl").read_text().splitlines()
    assert len(rows) + len(ties) == 96 and len(rows) >= 40
    first = rows[0]
    assert first["provenance"]["judge"] == "rule" and len(first["provenance"]["scores"]) == 4
    assert max(first["provenance"]["scores"]) > min(first["provenance"]["scores"])

    # A rerun labels nothing again: every prompt is already in the output or the ties file.
    assert label(load_label_config(config)) == {"labelled": 0, "ties": 0, "skipped": 96}

    held_out = _rows("preference_eval.jsonl", 100)
    before = _preference_accuracy(sft_model, held_out)
    dpo = {"output_dir": str(tmp_path / "dpo"), "seed": 0, "model": {"path": sft_model}, "tokenizer": "builtin",
           "stages": [{"name": "dpo", "losses": [{"name": "dpo", "beta": 0.1}], "reference": {"name": "frozen_copy"},
                       "data": {"train": str(output), "template": "plain", "max_length": 48},
                       "eval": {"at_start": False},
                       "train": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-4}}]}
    after = _preference_accuracy(str(train(dpo).final_model_dir), held_out)
    print(f"held-out preference accuracy: {before:.2f} -> {after:.2f}")
    assert after >= before + 0.2, (before, after)


def test_label_resumes_after_a_partial_output(sft_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", _rows("prompts_train.jsonl", 8))
    output = tmp_path / "labelled.jsonl"
    # A previous run labelled prompt 0 and crashed while writing the next line.
    kept = {"prompt": "kept", "chosen": "a", "rejected": "b", "provenance": {"prompt_index": 0}}
    output.write_text(json.dumps(kept) + "\n" + '{"prompt": "torn')
    config = load_label_config({"output": str(output), "model": {"path": sft_model}, "tokenizer": "builtin",
                                "prompts": str(prompts), "judge": {"name": "rule", "regex": "kind"},
                                "num_completions": 2, "max_new_tokens": 12})
    counts = label(config)
    assert counts["skipped"] == 1 and counts["labelled"] + counts["ties"] == 7
    assert output.read_text().splitlines()[0] == json.dumps(kept)


def test_label_with_a_pairwise_llm_judge(sft_model, tmp_path):
    """``pairwise: true`` ranks answers by the judge's position-debiased pairwise comparisons."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    output = tmp_path / "labelled.jsonl"
    config = load_label_config({"output": str(output), "model": {"path": sft_model}, "tokenizer": "builtin",
                                "prompts": str(write_jsonl(tmp_path / "p.jsonl", _rows("prompts_train.jsonl", 4))),
                                "judge": {"name": "llm", "path": str(tmp_path / "judge"),
                                          "constitution": ["Prefer kind answers."]},
                                "pairwise": True, "num_completions": 3, "max_new_tokens": 12})
    counts = label(config)
    assert counts["labelled"] + counts["ties"] == 4
    ties = output.with_name(output.name + ".ties.jsonl")
    written = [json.loads(line) for path in (output, ties) for line in path.read_text().splitlines()]
    assert len(written) == 4
    for row in written:
        wins = row["provenance"]["scores"]
        # three answers, three comparisons: the win probabilities add up to the number of pairs
        assert sum(wins) == pytest.approx(3.0) and row["provenance"]["comparison"] == "pairwise"
        if "chosen" in row:
            assert row["chosen"] == row["provenance"]["completions"][wins.index(max(wins))]


def test_the_docs_table_lists_exactly_the_label_configs_keys_and_defaults():
    """docs/algorithms/constitutional_ai.md's key table is the LabelConfig model, key for key, in order,
    with each default, so neither can change without the other."""
    import re

    import yaml

    from aligner.commands.label import LabelConfig

    from .conftest import ROOT

    text = (ROOT / "docs" / "algorithms" / "constitutional_ai.md").read_text()
    table = text.split("<!-- label-config-keys -->\n", 1)[1].split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [re.fullmatch(r"`(\w+)`", row[0]).group(1) for row in rows] == list(LabelConfig.model_fields)
    for row in rows:
        name, default = row[0].strip("`"), row[2]
        field = LabelConfig.model_fields[name]
        if field.is_required():
            assert default == "required", name
        else:
            documented = yaml.safe_load(re.match(r"`([^`]*)`", default).group(1))
            assert documented == field.default, (name, documented, field.default)
        assert row[3], f"'{name}' has no meaning in the table"
