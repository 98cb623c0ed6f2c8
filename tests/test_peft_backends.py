"""PEFT backends: adapters train at every step, base weights never change, QLoRA's CPU trap is guarded."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aligner import hookimpl
from aligner.api import train
from aligner.errors import ConfigError
from aligner.modeling.logprobs import completion_logprobs
from aligner.peft_backends.peft_generic import PeftMethodBackend
from aligner.peft_backends.qlora import QLoRABackend
from aligner.peft_backends.quantization import guard_4bit_training, is_packed_for_cpu
from aligner.plugins import temporary_plugin
from tests.conftest import preference_rows


def _snapshot(model, trainable: bool) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if trainable:
        return {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    # Base weights including 4-bit storage and its quantisation constants (all state, no adapters).
    trained = {n for n, p in named.items() if p.requires_grad}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n not in trained}


class WeightWatcher:
    """After every step: which adapter tensors changed, and whether any base tensor did."""

    def __init__(self):
        self.changed_per_step: list[tuple[int, int]] = []
        self.base_changed: list[str] = []

    @hookimpl
    def on_run_start(self, run):
        self.model = run.accelerator.unwrap_model(run.model)
        self.base = _snapshot(self.model, trainable=False)
        self.last = _snapshot(self.model, trainable=True)

    @hookimpl
    def on_step_end(self, run, step, metrics):
        now = _snapshot(self.model, trainable=True)
        changed = sum(not torch.equal(now[n], self.last[n]) for n in now)
        self.changed_per_step.append((changed, len(now)))
        self.last = now
        base = _snapshot(self.model, trainable=False)
        self.base_changed += [n for n in self.base if not torch.equal(self.base[n], base[n])]


PEFT_CHOICES = {
    "lora": {"name": "lora", "r": 4},
    "dora": {"name": "dora", "r": 4},
    "qlora": {"name": "qlora", "r": 4},
    "ia3": {"name": "peft", "method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
    "prefix_tuning": {"name": "peft", "method": "prefix_tuning", "num_virtual_tokens": 4},
    # orthogonal fine-tuning: block-diagonal rotations of q/v (block size 8 divides the tiny model's 32)
    "oft": {"name": "peft", "method": "oft", "target_modules": ["q_proj", "v_proj"], "oft_block_size": 8, "r": 0},
}


@pytest.mark.parametrize(("backend", "reference"), [*((b, "disabled_adapter") for b in PEFT_CHOICES),
                                                    ("qlora", "cached")])
def test_dpo_trains_adapters_every_step_and_never_the_base(make_config, tmp_path, backend, reference):
    if backend == "qlora":
        pytest.importorskip("bitsandbytes")
    rows = preference_rows(12)
    # Evaluating after every step puts an eval-mode no_grad forward (the QLoRA trap) between steps;
    # the cached reference's precomputation is another one, before the first step.
    choice = {"name": reference, **({"dir": str(tmp_path / "cache")} if reference == "cached" else {})}
    config = make_config("dpo", rows=rows[:8], eval_rows=rows[8:], steps=3,
                         reference=choice, peft=PEFT_CHOICES[backend])
    config["stages"][0]["train"].update({"weight_decay": 0.0, "eval_every": 1, "batch_size": 4})
    watcher = WeightWatcher()
    with temporary_plugin(watcher, name="watcher"):
        train(config)
    assert len(watcher.changed_per_step) == 3
    (first_changed, total), *later = watcher.changed_per_step
    # Step 1: LoRA's B starts at zero so A gets no gradient yet; every later step moves every tensor.
    assert first_changed >= total // 2 and first_changed > 0
    assert all(changed == total for changed, total in later), watcher.changed_per_step
    assert watcher.base_changed == []


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def _adapter_grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _bnb_repacks_on_this_cpu() -> bool:
    bnb = pytest.importorskip("bitsandbytes")

    return bool(getattr(bnb.nn.Linear4bit(64, 64), "support_avx512bf16_for_cpu", False))


def test_the_qlora_trap_and_its_guard():
    """Unguarded, one eval forward under no_grad repacks the 4-bit weights and breaks LoRA gradients."""
    if not _bnb_repacks_on_this_cpu():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    for guarded in (False, True):
        backend = QLoRABackend(QLoRABackend.Options(r=4, target_modules=["q_proj"]))
        model = backend.apply(_tiny_llama())
        # Give B a value so every adapter tensor has a gradient from the start.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if not guarded:  # undo the guard to show what it prevents
            for module in model.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = True
                    module._forward_pre_hooks.clear()
        before = _adapter_grads(model, ids)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        packed = any(is_packed_for_cpu(m) for m in model.modules())
        results[guarded] = (packed, before, _adapter_grads(model, ids))
    packed, before, after = results[False]
    assert packed
    # q_proj's adapter reaches the loss only through frozen 4-bit layers (o_proj, ...), whose
    # repacked kernel has no backward: its gradient is gone or wrong.
    assert any(after[n] is None or not torch.allclose(after[n], before[n], atol=1e-5) for n in before)
    packed, before, after = results[True]
    assert not packed
    assert all(after[n] is not None and torch.allclose(after[n], before[n], atol=1e-6) for n in before)


def test_guard_unpacks_a_layer_that_was_already_packed_and_refuses_a_repacked_one():
    if not _bnb_repacks_on_this_cpu():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks")
    from aligner.peft_backends.quantization import quantize_4bit

    model = _tiny_llama()
    quantize_4bit(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert any(is_packed_for_cpu(m) for m in model.modules())
    assert guard_4bit_training(model) == 14
    assert not any(is_packed_for_cpu(m) for m in model.modules())
    layer = model.model.layers[0].self_attn.q_proj
    layer.support_avx512bf16_for_cpu = True  # something re-enables the repacking
    model.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="repacked"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_generic_backend_rejects_unknown_methods_and_options(make_config):
    with pytest.raises(ConfigError, match="unknown peft method 'ia4'.*did you mean 'ia3'"):
        train(make_config("dpo", peft={"name": "peft", "method": "ia4"}))
    with pytest.raises(ConfigError, match="unknown option 'num_virtual_token' .*did you mean 'num_virtual_tokens'"):
        train(make_config("dpo", peft={"name": "peft", "method": "prompt_tuning", "num_virtual_token": 3}))


def test_loftq_without_a_gpu_is_a_config_error_naming_the_key(make_config, tmp_path, monkeypatch):
    """peft computes LoftQ on CUDA only: said at config time, before any model loads or file is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = make_config("dpo", peft={"name": "peft", "method": "lora", "r": 4, "init_lora_weights": "loftq",
                                      "loftq_config": {"loftq_bits": 4}})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.peft.*'loftq' needs a CUDA GPU"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
@pytest.mark.parametrize("trim", [True, False])
def test_completion_logprobs_align_with_virtual_tokens(method, trim, monkeypatch):
    """Prompt/P-tuning prepend virtual positions to the logits; log-probs still score the right tokens."""
    import aligner.modeling.logprobs as logprobs

    extra = {"encoder_hidden_size": 16} if method == "p_tuning" else {}
    backend = PeftMethodBackend(PeftMethodBackend.Options(method=method, num_virtual_tokens=3, **extra))
    model = backend.apply(_tiny_llama()).eval()
    if not trim:
        monkeypatch.setattr(logprobs, "_accepts_logits_to_keep", lambda cls: False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (torch.arange(6) < torch.tensor([[6], [4]])).long(),
             "completion_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]]),
             "prompt_lengths": torch.tensor([2, 3])}
    with torch.no_grad():
        got = completion_logprobs(model, batch)
        full = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    real = full[:, full.shape[1] - ids.shape[1]:].log_softmax(-1)  # drop virtual positions
    expected = torch.stack([
        sum(real[b, t - 1, ids[b, t]] for t in range(6) if batch["completion_mask"][b, t]) for b in range(2)])
    assert got.logps == pytest.approx(expected, abs=1e-5)
    assert got.num_tokens.tolist() == [4, 1]


def test_adalora_reallocates_ranks_during_training(make_config):
    """AdaLoRA is more than LoRA at a fixed rank: its budget schedule runs after every step."""
    import aligner

    ranks_seen = []

    class Watch:
        @aligner.hookimpl
        def on_step_end(self, run, step, metrics):
            model = run.accelerator.unwrap_model(run.model)
            ranks_seen.append(model.peft_config["default"].rank_pattern is not None)

    from aligner.plugins import temporary_plugin

    peft = {"name": "peft", "method": "adalora", "init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1,
            "deltaT": 1, "total_step": 5, "target_modules": ["q_proj", "v_proj"]}
    with temporary_plugin(Watch(), "watch"):
        aligner.train(make_config("dpo", steps=5, peft=peft, reference={"name": "disabled_adapter"}))
    # The final phase of the schedule (step > total_step - tfinal) fixes the learned rank pattern.
    assert ranks_seen[-1] is True
