"""Every PEFT method trains DPO end to end: exactly its own weights move, the base never does, and
each reference policy either gives the starting policy, gives the base model, or is refused.

Two DPO steps per (method, reference) on a one-layer model; BitFit runs on a copy of that model with
biases (the tiny Llama has none), saved to a temporary directory and loaded by path.
"""

from __future__ import annotations

import re

import pytest
import torch

from aligner import hookimpl
from aligner.api import train
from aligner.errors import ConfigError
from aligner.plugins import temporary_plugin
from tests.conftest import preference_rows

# method -> (peft choice, pattern every trainable parameter name must match)
METHODS = {
    "lora": ({"name": "lora", "r": 4}, r"\.lora_[AB]\."),
    "qlora": ({"name": "qlora", "r": 4}, r"\.lora_[AB]\."),
    "dora": ({"name": "dora", "r": 4}, r"\.lora_(A|B|magnitude_vector)\."),
    # tinit > 2 keeps both steps in AdaLoRA's warm-up, before rank pruning zeroes parts of E again
    "adalora": ({"name": "peft", "method": "adalora", "init_r": 4, "target_r": 2, "tinit": 5, "tfinal": 2,
                 "total_step": 10, "target_modules": ["q_proj", "v_proj"]}, r"\.lora_[ABE]\."),
    "oft": ({"name": "peft", "method": "oft", "target_modules": ["q_proj", "v_proj"], "oft_block_size": 8, "r": 0},
            r"\.oft_R\."),
    "ia3": ({"name": "peft", "method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
             "feedforward_modules": ["down_proj"]}, r"\.ia3_l\."),
    "lokr": ({"name": "peft", "method": "lokr", "r": 4, "target_modules": ["q_proj", "v_proj"]}, r"\.lokr_w[12]\."),
    "loha": ({"name": "peft", "method": "loha", "r": 4, "target_modules": ["q_proj", "v_proj"]},
             r"\.hada_w[12]_[ab]\."),
    "adaption_prompt": ({"name": "peft", "method": "adaption_prompt", "adapter_len": 4, "adapter_layers": 1},
                        r"\.adaption_(gate|prompt)$"),
    "ln_tuning": ({"name": "peft", "method": "ln_tuning"}, r"layernorm\.ln_tuning_layers\.|norm\.ln_tuning_layers\."),
    "prompt_tuning": ({"name": "peft", "method": "prompt_tuning", "num_virtual_tokens": 4},
                      r"^prompt_encoder\.default\.embedding\."),
    "p_tuning": ({"name": "peft", "method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
                 r"^prompt_encoder\.default\."),
    "prefix_tuning": ({"name": "peft", "method": "prefix_tuning", "num_virtual_tokens": 4},
                      r"^prompt_encoder\.default\.embedding\."),
    "bitfit": ({"name": "bitfit"}, r"_proj\.bias$"),
    "bitfit_qv": ({"name": "bitfit", "target_modules": ["q_proj", "v_proj"]}, r"\.(q|v)_proj\.bias$"),
}
PROMPT_LEARNING = {"prompt_tuning", "p_tuning", "prefix_tuning"}
REFERENCES = ("disabled_adapter", "frozen_copy", "cached")


def reference_outcome(method: str, reference: str) -> str:
    """What each reference is for each method (the table in docs/reference_and_peft.md).

    ``start``: the policy before any update (DPO's implicit rewards start at exactly 0);
    ``base``: the base model without the virtual tokens, as in TRL (rewards start non-zero);
    ``refused``: a config error before anything trains.
    """
    if method.startswith("bitfit") and reference == "disabled_adapter":
        return "refused"  # BitFit trains the model's own biases: no adapter to switch off
    if method in PROMPT_LEARNING and reference != "frozen_copy":
        return "base"  # adapters off (or the cache, computed adapters off) = no virtual tokens
    return "start"


class Watcher:
    """Snapshots before the first step and after the last (before the stage merges adapters away)."""

    @hookimpl
    def on_run_start(self, run):
        self.model = run.accelerator.unwrap_model(run.model)
        self.trainable_before = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        # The base: every state tensor that is not trained (4-bit storage and constants included).
        self.base_before = {n: t.detach().clone() for n, t in self.model.state_dict().items()
                            if n not in self.trainable_before}
        self.first_metrics: dict | None = None

    @hookimpl
    def on_step_end(self, run, step, metrics):
        if self.first_metrics is None:
            self.first_metrics = dict(metrics)
        self.last_metrics = dict(metrics)
        self.params_after = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.state_after = {n: t.detach().clone() for n, t in self.model.state_dict().items()}


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory) -> str:
    """The tests' tiny Llama with q/k/v/o and MLP biases, saved where ``model.path`` can load it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("biased") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _config(make_config, tmp_path, method: str, reference: str, model_dir: str) -> dict:
    choice = {"name": reference, **({"dir": str(tmp_path / "cache")} if reference == "cached" else {})}
    config = make_config("dpo", rows=preference_rows(8), steps=2, reference=choice, peft=METHODS[method][0])
    # No weight decay: a tensor that moves moved because of its gradient.
    config["stages"][0]["train"]["weight_decay"] = 0.0
    if method.startswith("bitfit"):
        config["model"] = {"path": model_dir}
    return config


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("method", list(METHODS))
def test_dpo_moves_exactly_the_methods_weights(make_config, tmp_path, biased_model_dir, method, reference):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    config = _config(make_config, tmp_path, method, reference, biased_model_dir)
    outcome = reference_outcome(method, reference)
    if outcome == "refused":
        with pytest.raises(ConfigError, match=r"stages\[0\]\.reference.*stages\[0\]\.peft"):
            train(config)
        return
    watcher = Watcher()
    with temporary_plugin(watcher, name="watcher"):
        train(config)

    pattern = METHODS[method][1]
    trained = watcher.trainable_before
    assert trained, "nothing was trainable"
    assert [n for n in trained if not re.search(pattern, n)] == [], "a non-method weight trained"
    unmoved = [n for n in trained if torch.equal(watcher.params_after[n], trained[n])]
    assert unmoved == [], "method weights that never moved"
    changed = [n for n, t in watcher.base_before.items() if not torch.equal(watcher.state_after[n], t)]
    assert changed == [], "base weights changed"

    def gap(metrics: dict) -> float:  # |policy - reference| log-prob gap, times beta
        return max(abs(metrics["rewards/chosen"]), abs(metrics["rewards/rejected"]))

    if outcome == "start":
        assert gap(watcher.first_metrics) < 1e-5
    else:
        assert gap(watcher.first_metrics) > 1e-4
    # After one update the policy has moved and the reference has not (a disable_adapter() that
    # switched nothing off would make the reference follow the policy: a gap of exactly 0). Only
    # non-zero is asked: after one step of 1e-3 AdaLoRA's E (its only moved part) changes logits by ~1e-7.
    assert gap(watcher.last_metrics) > 0


def test_bitfit_refuses_a_model_without_biases(make_config):
    """The tiny Llama has no biases: training nothing silently would be worse than an error."""
    with pytest.raises(ConfigError, match=r"bitfit.*has none; use a model with biases"):
        train(make_config("dpo", reference={"name": "frozen_copy"}, peft={"name": "bitfit"}))


def test_bitfit_names_the_target_modules_that_have_no_bias(make_config, biased_model_dir):
    config = make_config("dpo", reference={"name": "frozen_copy"}, peft={"name": "bitfit", "target_modules": ["lm_head"]})
    config["model"] = {"path": biased_model_dir}
    with pytest.raises(ConfigError, match=r"none in the modules lm_head \(peft\.target_modules\)"):
        train(config)


def test_bitfit_trains_a_reward_models_fresh_score_head_with_the_biases(make_config, biased_model_dir):
    """A frozen score head would stay at its random initialisation: BitFit trains it as LoRA does."""
    config = make_config("reward_model", rows=preference_rows(8), steps=2, peft={"name": "bitfit"})
    config["stages"][0]["train"]["weight_decay"] = 0.0
    config["model"] = {"path": biased_model_dir}
    watcher = Watcher()
    with temporary_plugin(watcher, name="watcher"):
        train(config)
    trained = watcher.trainable_before
    assert {n for n in trained if not n.endswith("_proj.bias")} == {"score.weight"}
    assert all(not torch.equal(watcher.params_after[n], t) for n, t in trained.items())
    assert all(torch.equal(watcher.state_after[n], t) for n, t in watcher.base_before.items())


def test_loftq_trains_on_a_gpu_and_is_refused_without_one(make_config, tmp_path):
    """peft computes LoftQ's initialisation on CUDA: without a GPU (or scipy) the config is refused."""
    import importlib.util

    peft = {"name": "peft", "method": "lora", "r": 4, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}
    config = make_config("dpo", steps=2, reference={"name": "frozen_copy"}, peft=peft)
    if not torch.cuda.is_available() or importlib.util.find_spec("scipy") is None:
        with pytest.raises(ConfigError, match=r"stages\[0\]\.peft.*'loftq' needs"):
            train(config)
        assert not (tmp_path / "run").exists()
        return
    watcher = Watcher()
    with temporary_plugin(watcher, name="watcher"):
        train(config)
    trained = watcher.trainable_before
    assert trained and all(re.search(r"\.lora_[AB]\.", n) for n in trained)
    assert all(not torch.equal(watcher.params_after[n].cpu(), t.cpu()) for n, t in trained.items())


def test_the_benchmark_measures_a_method_in_its_own_process(tmp_path):
    """``bench/peft_methods.py`` (the docs' table) runs; BitFit covers its saved model with biases."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "peft_methods.py"), "--quick", "--methods", "bitfit",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(out.read_text())["results"]["bitfit"]
    assert "error" not in measured, measured
    # hidden 64, 2 layers, MLP 176: per layer q/k/v/o biases 4 x 64 and gate/up/down 176 + 176 + 64
    assert measured["trainable"] == 2 * (4 * 64 + 176 + 176 + 64)
    assert measured["peak_rss_mib"] > 0 and "| bitfit | 1,344 |" in done.stdout
