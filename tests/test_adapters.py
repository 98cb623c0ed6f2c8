"""Several named adapters on one base: trained stage by stage, saved side by side, switched by
``aligner generate --adapter``, merged one at a time by ``aligner export --adapter``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from aligner.api import train
from aligner.cli import main
from aligner.config import TinyModelConfig, load_config
from aligner.errors import ConfigError
from aligner.modeling.loading import build_tiny_model
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
from aligner.peft_backends.lora import LoRABackend
from aligner.training.stages import prepare_stages
from tests.conftest import sft_rows, tiny_model, write_jsonl

PROMPTS = [row["prompt"] for row in sft_rows(12)]


def _save_base(directory: Path) -> Path:
    """A tiny base model on disk. Its tied output head is scaled up: at the random init's 0.02 scale the
    logits cannot leave the uniform distribution, whatever an adapter does, so no answer could be learnt."""
    tokenizer = load_builtin_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(**tiny_model()["tiny"]), tokenizer, torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _stage(name: str, data: Path, backend: str = "lora", **peft: object) -> dict:
    return {"name": name, "data": {"train": str(data), "template": "plain", "max_length": 48},
            "losses": [{"name": "sft"}], "peft": {"name": backend, "r": 8, "alpha": 64, **peft},
            "train": {"max_steps": 10, "batch_size": 12, "learning_rate": 0.05, "lr_scheduler": "constant"}}


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory) -> Path:
    """One run, two stages: adapter 'water' learns to answer "water", then 'people' to answer "people"."""
    tmp = tmp_path_factory.mktemp("adapters")
    base = _save_base(tmp / "base")
    data = {w: write_jsonl(tmp / f"{w}.jsonl", [{"prompt": p, "completion": w} for p in PROMPTS])
            for w in ("water", "people")}
    config = {"output_dir": str(tmp / "run"), "seed": 0, "model": {"path": str(base)},
              "stages": [_stage("water", data["water"], adapter_name="water"),
                         _stage("people", data["people"], adapter_name="people")]}
    train(config)
    return tmp / "run"


def _generate(capsys, run_dir: Path, *argv: str) -> dict:
    """``aligner generate`` on the training prompts (a .txt file, one per line), 4 answers each, as JSON."""
    prompts = run_dir.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["generate", str(run_dir), *argv, "--prompts", str(prompts), "--num-samples", "4",
                 "--max-new-tokens", "2", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _first_words(samples: list[dict], adapter: str | None) -> Counter:
    return Counter(s["completion"].split(" ")[0] for s in samples if s["adapter"] == adapter)


def _share(counts: Counter, word: str) -> float:
    return counts[word] / sum(counts.values())


def test_each_adapter_is_saved_in_its_own_folder_and_trained_only_in_its_stage(two_adapters):
    from safetensors.torch import load_file

    final = two_adapters / "people" / "final"
    assert sorted(p.name for p in final.iterdir() if (p / "adapter_config.json").is_file()) == ["people", "water"]
    after_stage_1 = load_file(two_adapters / "water" / "final" / "water" / "adapter_model.safetensors")
    at_the_end = load_file(final / "water" / "adapter_model.safetensors")
    # Stage 2 trained 'people' only: 'water' is bit for bit what stage 1 saved.
    assert after_stage_1.keys() == at_the_end.keys()
    assert all(torch.equal(after_stage_1[k], at_the_end[k]) for k in after_stage_1)


def test_switching_the_adapter_switches_the_behaviour(two_adapters, capsys):
    samples = _generate(capsys, two_adapters, "--no-adapter")["samples"]
    assert {s["adapter"] for s in samples} == {None, "water", "people"}
    water, people, base = (_first_words(samples, a) for a in ("water", "people", None))
    assert _share(water, "water") > 0.6 and _share(water, "people") < 0.1
    assert _share(people, "people") > 0.6 and _share(people, "water") < 0.1
    assert _share(base, "water") < 0.1 and _share(base, "people") < 0.1


def test_adapter_option_picks_one_adapter(two_adapters, capsys):
    samples = _generate(capsys, two_adapters, "--adapter", "people")["samples"]
    assert {s["adapter"] for s in samples} == {"people"}
    assert len(samples) == 4 * len(PROMPTS)


def test_export_merges_the_named_adapter(two_adapters, tmp_path, capsys):
    merged = tmp_path / "merged-water"
    assert main(["export", str(two_adapters), "--merge", "--adapter", "water", "--output", str(merged)]) == 0
    capsys.readouterr()
    assert not (merged / "adapter_config.json").exists()
    samples = _generate(capsys, merged)["samples"]
    assert _share(_first_words(samples, None), "water") > 0.6


def test_export_without_merge_copies_the_named_adapter_alone(two_adapters, tmp_path, capsys):
    copy = tmp_path / "people-adapter"
    assert main(["export", str(two_adapters), "--adapter", "people", "--output", str(copy)]) == 0
    # A plain single-adapter folder (what PeftModel.from_pretrained reads), with the run's tokenizer.
    assert (copy / "adapter_config.json").is_file() and (copy / "tokenizer.json").is_file()
    assert not (copy / "water").exists()


def test_export_of_several_adapters_needs_a_name(two_adapters, tmp_path, capsys):
    assert main(["export", str(two_adapters), "--merge", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "several adapters (people, water)" in err and "--adapter NAME" in err
    assert not (tmp_path / "x").exists()


def test_unknown_adapter_is_a_located_error_listing_the_adapters(two_adapters, capsys):
    assert main(["generate", str(two_adapters), "--adapter", "peple", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--adapter peple" in err and "did you mean 'people'" in err and "adapters: people, water" in err
    assert main(["export", str(two_adapters), "--merge", "--adapter", "nope"]) == 2
    assert "adapters: people, water" in capsys.readouterr().err
    assert main(["generate", str(two_adapters), "--stage", "peple", "--prompt", "hi"]) == 2
    assert "--stage peple" in (err := capsys.readouterr().err) and "stages with one: people, water" in err


def test_adapter_for_a_model_without_adapters_is_an_error(tmp_path, capsys):
    base = _save_base(tmp_path / "base")
    assert main(["generate", str(base), "--adapter", "water", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--adapter water: {base} is a full model, not adapters" in err


def test_generate_without_prompts_or_with_a_missing_source_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: one of --prompt / --prompts is required
        main(["generate", str(tmp_path)])
    assert exit_info.value.code == 2
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_adapter_name_must_be_a_folder_name_and_lora_or_dora(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": "water"} for p in PROMPTS])
    config = {"output_dir": str(tmp_path / "run"), "model": tiny_model(), "tokenizer": "builtin",
              "stages": [_stage("a", data, adapter_name="a/b")]}
    with pytest.raises(ConfigError, match="cannot name an adapter"):
        prepare_stages(load_config(config))
    config["stages"] = [_stage("a", data, "qlora", adapter_name="water")]
    with pytest.raises(ConfigError, match="lora and dora backends only"):
        prepare_stages(load_config(config))


def test_an_unnamed_lora_stage_after_named_ones_is_refused():
    tokenizer = load_builtin_tokenizer()
    model = build_tiny_model(TinyModelConfig(**tiny_model()["tiny"]), tokenizer, torch.float32)
    named = LoRABackend(LoRABackend.Options(adapter_name="water"))
    wrapped = named.release(named.apply(model))
    with pytest.raises(ConfigError, match=r"named adapters of earlier stages \(water\)"):
        LoRABackend().apply(wrapped)


def test_a_stage_trains_only_its_own_adapter_and_can_continue_an_earlier_one():
    tokenizer = load_builtin_tokenizer()
    model = build_tiny_model(TinyModelConfig(**tiny_model()["tiny"]), tokenizer, torch.float32)

    def stage(name: str, model: torch.nn.Module) -> torch.nn.Module:
        backend = LoRABackend(LoRABackend.Options(adapter_name=name))
        return backend.release(backend.apply(model))

    def trainable(model: torch.nn.Module) -> set[str]:
        return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}

    model = stage("people", stage("water", model))
    assert sorted(model.peft_config) == ["people", "water"] and trainable(model) == {"people"}
    again = stage("water", model)  # e.g. DPO after SFT of the same task's adapter
    assert again is model and sorted(model.peft_config) == ["people", "water"] and trainable(model) == {"water"}


def test_a_run_with_named_adapters_resumes_bit_for_bit(two_adapters, tmp_path):
    """Killed at step 3 of the first stage (checkpoint at step 2 holds the 'water' adapter in its own
    folder), resumed: both adapters end exactly as in the uninterrupted run."""
    from safetensors.torch import load_file

    from tests.test_resume import run_interrupted_then_resumed

    tmp = two_adapters.parent
    stages = [_stage("water", tmp / "water.jsonl", adapter_name="water"),
              _stage("people", tmp / "people.jsonl", adapter_name="people")]
    stages[0]["train"]["save_every"] = 2
    config = {"output_dir": str(tmp_path / "run"), "seed": 0, "model": {"path": str(tmp / "base")}, "stages": stages}
    resumed = run_interrupted_then_resumed(config, kill_at=3)
    for name in ("water", "people"):
        a = load_file(str(two_adapters / "people" / "final" / name / "adapter_model.safetensors"))
        b = load_file(str(resumed.output_dir / "people" / "final" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
