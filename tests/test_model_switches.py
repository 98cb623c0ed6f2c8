"""Model and training switches: ``threads``, ``model.dtype``, ``model.attn_implementation`` and
``train.gradient_checkpointing``: validated, applied, and changing memory (not the maths)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aligner import train
from aligner.config import ModelConfig, load_config
from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.losses.dpo import DPOLoss
from aligner.modeling.loading import (
    apply_training_switches,
    load_model,
    resolve_dtype,
    set_gradient_checkpointing,
)
from aligner.modeling.logprobs import completion_logprobs
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
from aligner.plugins import temporary_plugin
from aligner.protocols import PREFERENCE, LossInputs, SequenceLogProbs
from aligner.training.threads import MAX_DEFAULT_THREADS, apply_threads, resolve_threads
from tests.conftest import tiny_model

# ---------------------------------------------------------------------------------------------
# Config: defaults and validation
# ---------------------------------------------------------------------------------------------


def test_defaults(make_config):
    config = load_config(make_config("dpo"))
    assert config.threads == "auto"
    assert config.model.dtype == "auto" and config.model.attn_implementation is None
    assert config.stages[0].train.gradient_checkpointing is False


@pytest.mark.parametrize(("override", "expected"), [
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("model.dtype=fp32", "model.dtype"),
    ("stages.dpo.train.gradient_checkpointing=sometimes", "stages[0].train.gradient_checkpointing"),
    ("threads=0", "threads"),
    ("threads=many", "threads"),
    ("stages.dpo.train.gradient_checkpoint=true", "did you mean 'gradient_checkpointing'"),
])
def test_invalid_values_name_their_key(make_config, override, expected):
    with pytest.raises(ConfigError, match="from override") as info:
        load_config(make_config("dpo"), [override])
    assert expected in str(info.value)


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


def test_threads_precedence_config_then_environment_then_default(monkeypatch):
    monkeypatch.setattr("aligner.training.threads.usable_cores", lambda: 2)
    assert resolve_threads(3, {"OMP_NUM_THREADS": "1"})[0] == 3  # the config's number wins
    assert resolve_threads("auto", {"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS")
    assert resolve_threads("auto", {"OMP_NUM_THREADS": "4,2"})[0] == 4  # OpenMP's nested list: the outer level
    assert resolve_threads("auto", {})[0] == 2
    assert resolve_threads("auto", {"WORLD_SIZE": "4"})[0] == 1  # several processes: one thread each
    assert resolve_threads("auto", {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "1"})[0] == 2  # one process on this node
    monkeypatch.setattr("aligner.training.threads.usable_cores", lambda: 64)
    assert resolve_threads("auto", {})[0] == MAX_DEFAULT_THREADS


def test_usable_cores_follow_the_affinity_mask(monkeypatch):
    import aligner.training.threads as threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 96)
    assert threads.usable_cores() == 3


def test_invalid_omp_num_threads_is_refused():
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='two'"):
        resolve_threads("auto", {"OMP_NUM_THREADS": "two"})


def test_apply_threads_sets_torch_and_logs(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="aligner"):
            assert apply_threads("auto", {"OMP_NUM_THREADS": "1"}) == 1
        assert torch.get_num_threads() == 1
        assert "torch threads: 1 per process (OMP_NUM_THREADS" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_a_run_applies_the_threads_setting(make_config, caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="aligner"):
            train(make_config("sft", steps=1, eval={"at_start": False}), ["threads=1"])
        assert "torch threads: 1 per process (threads in the config" in caplog.text
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# model.dtype and model.attn_implementation
# ---------------------------------------------------------------------------------------------


def _model_config(**keys: object) -> ModelConfig:
    return ModelConfig.model_validate({**tiny_model(), **keys})


def _fake_cuda(monkeypatch, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_a_bf16_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32
    _fake_cuda(monkeypatch, bf16=True)
    assert resolve_dtype("auto") == torch.bfloat16
    _fake_cuda(monkeypatch, bf16=False)
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("float16") == torch.float16


def test_explicit_dtype_reaches_the_weights():
    model = load_model(_model_config(dtype="bfloat16"), load_builtin_tokenizer())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_tiny_and_saved_models(tmp_path, implementation):
    tokenizer = load_builtin_tokenizer()
    tiny = load_model(_model_config(attn_implementation=implementation), tokenizer)
    assert tiny.config._attn_implementation == implementation
    tiny.save_pretrained(tmp_path)
    # the real loading code, on a model saved to a directory (no hub here)
    for kind in ("logprobs", "reward"):
        loaded = load_model(ModelConfig(path=str(tmp_path), attn_implementation=implementation), tokenizer, kind)
        assert loaded.config._attn_implementation == implementation


def test_flash_attention_is_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 needs a CUDA GPU"):
        load_model(_model_config(attn_implementation="flash_attention_2"), load_builtin_tokenizer())


def test_flash_attention_is_refused_without_the_package_or_in_float32(monkeypatch):
    import importlib.util

    _fake_cuda(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="needs the flash-attn package.*pip install flash-attn"):
        load_model(_model_config(attn_implementation="flash_attention_2"), load_builtin_tokenizer())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: SimpleNamespace(name=name))
    with pytest.raises(ConfigError, match="runs in bfloat16 or float16, but model.dtype gives float32"):
        load_model(_model_config(attn_implementation="flash_attention_2", dtype="float32"), load_builtin_tokenizer())


# ---------------------------------------------------------------------------------------------
# train.gradient_checkpointing: on where it matters, same loss and gradients
# ---------------------------------------------------------------------------------------------


def _llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2))


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: non-zero adapters, so the adapters' gradients depend on every layer
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))


def _preference_batch(pairs: int = 2, length: int = 24) -> dict:
    """``pairs`` chosen rows then their rejected rows; a pair's rows share the prompt (as collated)."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 200, (pairs, 8), generator=generator)
    completions = torch.randint(0, 200, (2 * pairs, length - 8), generator=generator)
    ids = torch.cat([prompts.repeat(2, 1), completions], dim=1)
    attention = torch.ones_like(ids)
    attention[-1, -5:] = 0  # one shorter row: padding at its end
    prompt_lengths = torch.full((2 * pairs,), 8)
    completion = (torch.arange(length)[None] >= 8).long() * attention
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
            "prompt_lengths": prompt_lengths}


@contextmanager
def _saved_activation_bytes():
    """Count the bytes autograd keeps for the backward pass: what checkpointing exists to shrink."""
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _dpo_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One DPO loss and backward through aligner's log-prob path; the loss, gradients and saved bytes."""
    model.zero_grad(set_to_none=True)
    model.train()
    n = batch["input_ids"].shape[0]
    reference = SequenceLogProbs(torch.linspace(-60.0, -50.0, n), batch["completion_mask"].sum(-1))
    with _saved_activation_bytes() as saved:
        policy = completion_logprobs(model, batch)
        loss = DPOLoss().compute(LossInputs(PREFERENCE, policy, reference, batch)).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved[0]


def _decoder_layer_calls(model: torch.nn.Module) -> list[int]:
    """Runs of the decoder layers' first operation; transformers keeps a layer's own hooks outside the
    checkpoint, so a module inside it is what shows the recomputation."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = [0]
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.input_layernorm.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_same_loss_and_gradients_less_saved(adapters):
    model = _lora(_llama()) if adapters else _llama()
    batch = _preference_batch()
    loss_off, grads_off, saved_off = _dpo_step(model, batch)

    set_gradient_checkpointing(model, True)
    inner = model.get_base_model() if adapters else model
    assert inner.is_activation_checkpointing
    calls = _decoder_layer_calls(model)
    loss_on, grads_on, saved_on = _dpo_step(model, batch)

    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)
    assert set(grads_on) == set(grads_off) and grads_on
    if adapters:
        assert all("lora_" in name for name in grads_on)  # gradients reach the adapters in checkpointed layers
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert calls[0] == 2 * 3  # each of the 3 layers ran again in the backward: activations were recomputed
    assert saved_on < 0.7 * saved_off, (saved_on, saved_off)

    set_gradient_checkpointing(model, False)  # a later stage without it gets it off again
    assert not inner.is_activation_checkpointing
    assert not getattr(inner, "_require_grads_hooks", None)
    loss_again, _, saved_again = _dpo_step(model, batch)
    torch.testing.assert_close(loss_again, loss_off)
    assert saved_again == saved_off


def test_gradient_checkpointing_sft_step_matches():
    from aligner.losses.sft import SFTLoss

    model = _llama(layers=2)
    batch = _preference_batch()

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.train()
        loss = SFTLoss().compute(LossInputs("sft", completion_logprobs(model, batch), None, batch)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_off, grads_off = step()
    set_gradient_checkpointing(model, True)
    loss_on, grads_on = step()
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_checkpointing_leaves_no_grad_passes_alone():
    """Reference log-probs (``no_grad``) and evaluation stay plain forwards with the same values."""
    model = _lora(_llama())
    batch = _preference_batch()
    with torch.no_grad():
        plain = completion_logprobs(model, batch).logps
    set_gradient_checkpointing(model, True)
    with torch.no_grad(), model.disable_adapter():
        completion_logprobs(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(model, batch).logps, plain)


def test_activation_offload_same_loss_and_gradients(caplog):
    """On a GPU the layers' inputs go to pinned CPU memory; on a CPU run there is nothing to move."""
    from aligner.config import TrainConfig

    with pytest.raises(ValueError, match="set 'gradient_checkpointing: true' too"):
        TrainConfig(activation_offload=True)
    model = _lora(_llama(layers=2))
    batch = _preference_batch()
    loss_off, grads_off, _ = _dpo_step(model, batch)
    with caplog.at_level(logging.INFO, logger="aligner"):
        apply_training_switches(model, TrainConfig(gradient_checkpointing=True, activation_offload=True))
    offloaded = torch.accelerator.is_available()
    assert ("inputs offloaded to CPU" if offloaded else "nothing to offload without an accelerator") in caplog.text
    assert model.get_base_model().is_activation_checkpointing
    loss_on, grads_on, _ = _dpo_step(model, batch)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    apply_training_switches(model, TrainConfig())
    assert not model.get_base_model().is_activation_checkpointing


def test_a_stage_trains_with_gradient_checkpointing_on(make_config, tmp_path: Path):
    seen: list[bool] = []

    class Probe:
        @hookimpl
        def on_run_start(self, run):
            inner = next(m for m in run.accelerator.unwrap_model(run.model).modules() if hasattr(m, "config"))
            seen.append(inner.is_activation_checkpointing)

    config = make_config("dpo", steps=1, peft={"name": "lora", "r": 4}, eval={"at_start": False})
    config["stages"][0]["train"]["gradient_checkpointing"] = True
    with temporary_plugin(Probe(), name="gc-probe"):
        train(config)
    assert seen == [True]
