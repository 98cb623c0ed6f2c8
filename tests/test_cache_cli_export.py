"""``aligner cache`` and ``aligner export --merge``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aligner.api import train
from aligner.cli import main
from aligner.config import TinyModelConfig
from aligner.modeling.loading import build_tiny_model
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
from aligner.references.logprob_store import ReferenceCache
from tests.conftest import tiny_model


def test_cache_list_info_clear(tmp_path, capsys):
    cache = ReferenceCache(tmp_path)
    key = "ab" * 32
    cache.save(key, torch.tensor([1, 2]), torch.tensor([-1.5, -2.0]), torch.tensor([3, 4]),
               {"stage": "dpo", "split": "train"})
    assert main(["cache", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "dpo/train 2 sequences" in out
    assert main(["cache", "info", "abab", "--dir", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "ok" and info["sequences"] == 2 and info["key"] == key
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert cache.keys() == []
    assert main(["cache", "info", "zz", "--dir", str(tmp_path)]) == 2


def test_concurrent_identical_writes_leave_one_valid_entry(tmp_path):
    """Two runs writing the same entry at once: each write is a rename of a complete file."""
    from concurrent.futures import ThreadPoolExecutor

    cache = ReferenceCache(tmp_path)
    values = torch.linspace(-5, 0, 10_000)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: cache.save("k" * 64, torch.arange(10_000), values, torch.ones(10_000)), range(8)))
    entry = cache.load("k" * 64)
    assert torch.equal(entry.logps, values)
    assert [p.name for p in tmp_path.iterdir()] == ["k" * 64 + ".safetensors"]


@pytest.fixture
def base_model_dir(tmp_path):
    tokenizer = load_builtin_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(**tiny_model()["tiny"]), tokenizer, torch.float32)
    directory = tmp_path / "base"
    model.save_pretrained(directory)
    return directory


def test_merged_export_loads_with_plain_transformers_and_matches_the_adapter(make_config, base_model_dir, tmp_path):
    config = make_config("dpo", steps=3, reference={"name": "disabled_adapter"},
                         peft={"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    config["model"] = {"path": str(base_model_dir)}
    config["stages"][0]["train"]["learning_rate"] = 1e-2
    result = train(config)
    assert (result.final_model_dir / "adapter_config.json").is_file()
    out = tmp_path / "merged"
    assert main(["export", str(result.output_dir), "--merge", "--output", str(out)]) == 0
    assert not (out / "adapter_config.json").exists()

    ids = [[1, 5, 9, 13, 17, 21, 25]]
    # A fresh interpreter in which aligner and peft cannot even be imported.
    script = ("import sys, json, torch; sys.modules['aligner'] = None; sys.modules['peft'] = None\n"
              "from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
              f"print(json.dumps(m(input_ids=torch.tensor({ids})).logits[0].tolist()))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    merged_logits = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir),
                                        result.final_model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    with torch.no_grad():
        adapter_logits = adapter(input_ids=torch.tensor(ids)).logits[0]
        base_logits = base(input_ids=torch.tensor(ids)).logits[0]
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapter did learn something
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)


def test_export_finds_the_base_saved_by_the_previous_full_stage(tmp_path):
    from aligner.commands.export import _previous_stage_model

    (tmp_path / "config.yaml").write_text("stages: [{name: sft}, {name: dpo}]\n")
    for stage, files in (("sft", ["config.json"]), ("dpo", ["adapter_config.json"])):
        (tmp_path / stage / "final").mkdir(parents=True)
        for f in files:
            (tmp_path / stage / "final" / f).write_text("{}")
    assert _previous_stage_model(tmp_path / "dpo" / "final") == str(tmp_path / "sft" / "final")
    assert _previous_stage_model(tmp_path / "sft" / "final") is None
