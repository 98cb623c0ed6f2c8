"""Optimizer plugins: the default is the AdamW of before, each built-in trains the weights it should and
resumes bit for bit, config mistakes name their key, and a third-party optimizer is used."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import aligner
from aligner.config import load_config
from aligner.errors import ConfigError, PluginError
from aligner.optimizers import OptimizerContext
from aligner.plugins import get_registry, plugin_infos, temporary_plugin
from aligner.protocols import Options
from aligner.training.stages import prepare_stages

from .conftest import preference_rows
from .test_resume import run_interrupted_then_resumed

LORA = {"name": "lora", "r": 4}
# name -> (optimizer choice, PEFT backend it is tried with)
BUILT_IN = {
    "adamw": ({"name": "adamw"}, {"name": "full"}),
    # min_8bit_size: the tiny model's weights are below bitsandbytes' default threshold (4096 elements),
    # which would leave every state in 32 bits and test nothing 8-bit.
    "adamw_8bit": ({"name": "adamw_8bit", "min_8bit_size": 256}, {"name": "full"}),
    "lora_plus": ({"name": "lora_plus", "lr_ratio": 4}, LORA),
    "lora_fa": ({"name": "lora_fa"}, LORA),
}


class Snapshots:
    """Every weight of the trained module at the start of the stage and at its end."""

    @aligner.hookimpl
    def on_run_start(self, run):
        self.model = run.accelerator.unwrap_model(run.model)
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    @aligner.hookimpl
    def on_run_end(self, run, metrics):
        self.end = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def changed(self, marker: str) -> list[bool]:
        """For each weight whose name contains ``marker``: whether it changed."""
        names = [n for n in self.start if marker in n]
        assert names, f"no weight named like {marker}"
        return [not torch.equal(self.start[n], self.end[n]) for n in names]

    def base_changed(self) -> list[str]:
        return [n for n in self.start if "lora_" not in n and not torch.equal(self.start[n], self.end[n])]


def final_weights(result) -> dict[str, torch.Tensor]:
    directory = result.final_model_dir
    adapter = directory / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else directory / "model.safetensors"))


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_each_optimizer_trains_its_weights_and_resumes_bit_for_bit(make_config, tmp_path, name):
    if name == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    optimizer, peft = BUILT_IN[name]
    train = {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "save_every": 2, "lr_scheduler": "cosine",
             "warmup_ratio": 0.25}
    config = make_config("dpo", rows=preference_rows(16), train=train, optimizer=optimizer, peft=peft)
    config["output_dir"] = str(tmp_path / "straight")
    snapshots = Snapshots()
    with temporary_plugin(snapshots, "snapshots"):
        straight = aligner.train(config)

    if name == "lora_fa":
        assert not any(snapshots.changed("lora_A")), "LoRA-FA must leave every A matrix as initialised"
        assert all(snapshots.changed("lora_B"))
    elif name == "lora_plus":
        assert all(snapshots.changed("lora_A")) and all(snapshots.changed("lora_B"))
    else:
        assert all(snapshots.changed("layers.0.")), "every weight of the layer trains with full fine-tuning"
    if peft is LORA:
        assert snapshots.base_changed() == []
    if name == "adamw_8bit":  # the moments of the large weights are really stored in 8 bits
        saved = torch.load(straight.output_dir / "dpo" / "checkpoints" / "step-4" / "optimizer.pt", weights_only=True)
        # bitsandbytes nests its quantised state (state1/state2 in uint8, absmax, qmap) one level down.
        tensors = [t for state in saved["optimizer"]["state"].values() for value in state.values()
                   for t in (value.values() if isinstance(value, dict) else [value]) if isinstance(t, torch.Tensor)]
        assert torch.uint8 in {t.dtype for t in tensors}

    config["output_dir"] = str(tmp_path / "resumed")
    resumed = run_interrupted_then_resumed(config, kill_at=3)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: resumed weights differ from the uninterrupted run"


def _lora_context(lr: float = 1e-3) -> OptimizerContext:
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.peft_backends.lora import LoRABackend

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    policy = LoRABackend(LoRABackend.Options(r=4)).apply(base)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    return OptimizerContext(named_parameters=named, module=policy, policy=policy, learning_rate=lr, weight_decay=0.0)


def test_lora_plus_gives_b_ratio_times_the_learning_rate_of_a_at_every_step_of_the_schedule():
    from transformers import get_scheduler

    context = _lora_context(lr=1e-3)
    cls = get_registry("optimizer").get("lora_plus")
    optimizer = cls(cls.Options(lr_ratio=16)).build(context)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=4)
    names = {id(p): n for n, p in context.named_parameters}
    for _ in range(3):
        optimizer.step()  # no gradients: nothing moves, but the schedule may advance
        scheduler.step()
        rates = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
        a = {rates[n] for n in rates if "lora_A" in n}
        b = {rates[n] for n in rates if "lora_B" in n}
        assert len(a) == len(b) == 1 and a.pop() * 16 == pytest.approx(b.pop())
    assert len(rates) == len(context.named_parameters)  # every trainable weight is in a group


def test_lora_fa_freezes_a_and_optimizes_b():
    context = _lora_context()
    cls = get_registry("optimizer").get("lora_fa")
    cls(cls.Options()).build(context)
    assert not any(p.requires_grad for n, p in context.named_parameters if "lora_A" in n)
    assert all(p.requires_grad for n, p in context.named_parameters if "lora_B" in n)


def test_the_default_optimizer_is_torch_adamw_with_the_train_settings(make_config):
    config = load_config(make_config("dpo", train={"learning_rate": 2e-4, "weight_decay": 0.1, "max_steps": 1}))
    (stage,) = prepare_stages(config)
    assert stage.optimizer.name == "adamw"
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = stage.optimizer.build(OptimizerContext([("w", weight)], torch.nn.Module(), torch.nn.Module(),
                                                       learning_rate=2e-4, weight_decay=0.1))
    # fused: auto takes torch's fused kernel for plain CPU weights
    reference = torch.optim.AdamW([weight], lr=2e-4, weight_decay=0.1, fused=True)
    assert type(optimizer) is torch.optim.AdamW and optimizer.state_dict() == reference.state_dict()


def test_adamw_fused_and_loop_kernels_make_the_same_updates(make_config):
    from aligner.optimizers.adamw import AdamW, fused_kernel_applies

    torch.manual_seed(0)
    start, grads = torch.randn(64), [torch.randn(64) for _ in range(3)]
    weights = {}
    for fused in (True, False):
        weight = torch.nn.Parameter(start.clone())
        optimizer = AdamW(AdamW.Options(fused=fused)).build(
            OptimizerContext([("w", weight)], torch.nn.Module(), torch.nn.Module(), learning_rate=1e-2,
                             weight_decay=0.1))
        assert optimizer.param_groups[0]["fused"] is (True if fused else None)  # off: torch's default
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        weights[fused] = weight.detach()
    assert not torch.equal(weights[True], start)
    torch.testing.assert_close(weights[True], weights[False], atol=1e-6, rtol=1e-6)

    class Sharded(torch.Tensor):  # a tensor subclass such as FSDP's DTensor: no fused kernel for it
        pass

    assert fused_kernel_applies([torch.zeros(2)]) and not fused_kernel_applies([torch.zeros(2).as_subclass(Sharded)])
    assert not fused_kernel_applies([])


def _prepare(make_config, tmp_path=None, **stage):
    """Prepare the stage (no model loads); with ``tmp_path``, from a YAML file, so errors carry lines."""
    config = make_config("dpo", **stage)
    if tmp_path is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        config = path
    return prepare_stages(load_config(config))


def test_resuming_a_checkpoint_written_with_the_loop_kernel_keeps_the_fused_one_under_a_grad_scaler(tmp_path):
    """A checkpoint from before ``fused: auto`` (fused=None in its groups) resumed into a fused AdamW:
    the first scaled step used to fail (torch's loop kernel refuses the scaler's found_inf)."""
    from aligner.training.resume import Position, load_training_state, save_training_state

    weight = torch.nn.Parameter(torch.ones(4))
    old = torch.optim.AdamW([weight], lr=0.1)  # as written before: the loop kernel
    weight.grad = torch.ones(4)
    old.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(old, lambda step: 1.0)
    state = save_training_state(tmp_path, old, scheduler, Position(step=1))
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))

    fused = torch.optim.AdamW([weight], lr=0.1, fused=True)
    load_training_state(tmp_path, fused, torch.optim.lr_scheduler.LambdaLR(fused, lambda step: 1.0))
    assert fused.param_groups[0]["fused"] is True
    assert fused.state[weight]["step"] == 1  # the state itself did load
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    (weight * 1.0).sum().backward()
    weight.grad = None
    scaler.scale((weight * 1.0).sum()).backward()
    scaler.step(fused)  # the loop kernel raised "Expected grad_scale and found_inf to be None" here
    scaler.update()
    assert fused.state[weight]["step"] == 2


def test_a_resumed_fused_optimizer_keeps_its_step_counters_on_the_weights_device(tmp_path):
    """torch places each step counter by the loaded group's kernel: on the weight's device for the fused
    kernel (CUDA raises "Expected all tensors to be on the same device" otherwise), on the CPU for the
    loop. A meta weight stands in for a GPU one."""
    from aligner.training.resume import Position, load_training_state, save_training_state

    weight = torch.nn.Parameter(torch.ones(4))
    old = torch.optim.AdamW([weight], lr=0.1)  # the loop kernel: its step counter is a CPU tensor
    weight.grad = torch.ones(4)
    old.step()
    state = save_training_state(tmp_path, old, torch.optim.lr_scheduler.LambdaLR(old, lambda step: 1.0),
                                Position(step=1))
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    on_device = torch.nn.Parameter(torch.ones(4, device="meta"))
    fused = torch.optim.AdamW([on_device], lr=0.1, fused=True)
    load_training_state(tmp_path, fused, torch.optim.lr_scheduler.LambdaLR(fused, lambda step: 1.0))
    assert fused.param_groups[0]["fused"] is True
    assert fused.state[on_device]["step"].device == on_device.device


def test_an_unknown_optimizer_or_option_is_a_config_error_naming_the_key(make_config, tmp_path):
    # An unknown name is a PluginError like an unknown loss (the plugin may not be installed), located the same way.
    with pytest.raises(PluginError, match=r"unknown optimizer 'adam' at 'stages\[0\]\.optimizer' .*line.*"
                                          r"did you mean 'adamw'.*known: adamw, adamw_8bit, lora_fa, lora_plus"):
        _prepare(make_config, tmp_path, optimizer={"name": "adam"})
    with pytest.raises(ConfigError, match=r"unknown option 'stages\[0\]\.optimizer\.lr_ration' for 'lora_plus'.*"
                                          r"did you mean 'lr_ratio'"):
        _prepare(make_config, optimizer={"name": "lora_plus", "lr_ration": 4}, peft=LORA)
    with pytest.raises(ConfigError, match=r"invalid value for 'stages\[0\]\.optimizer\.lr_ratio'"):
        _prepare(make_config, optimizer={"name": "lora_plus", "lr_ratio": 0.5}, peft=LORA)


@pytest.mark.parametrize(("peft", "found"), [({"name": "full"}, "the PEFT backend 'full'"),
                                             ({"name": "dora", "r": 4}, "DoRA adapters"),
                                             ({"name": "peft", "method": "ia3"}, "the PEFT backend 'peft'")])
def test_lora_fa_on_a_stage_without_lora_is_refused_before_any_model_loads(make_config, tmp_path, peft, found):
    with pytest.raises(ConfigError) as info:
        aligner.train(make_config("dpo", optimizer={"name": "lora_fa"}, peft=peft))
    assert str(info.value).startswith(f"stage 'dpo': optimizer 'lora_fa' ('stages[0].optimizer.name') freezes LoRA's "
                                      f"A matrices and trains B, so it needs plain LoRA adapters, but 'stages[0].peft' "
                                      f"has {found}")
    assert not (tmp_path / "run").exists()


def test_lora_plus_without_lora_is_refused_and_with_generic_peft_lora_accepted(make_config):
    with pytest.raises(ConfigError, match=r"optimizer 'lora_plus'.*'stages\[0\]\.peft' has the PEFT backend 'full'"):
        _prepare(make_config, optimizer={"name": "lora_plus"})
    (stage,) = _prepare(make_config, optimizer={"name": "lora_plus"}, peft={"name": "peft", "method": "lora", "r": 4})
    assert stage.optimizer.options.lr_ratio == 16


def test_adamw_8bit_without_bitsandbytes_is_refused_clearly(make_config, monkeypatch):
    import aligner.optimizers.adamw_8bit as module

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as info:
        _prepare(make_config, optimizer={"name": "adamw_8bit"})
    assert str(info.value) == ("stage 'dpo': optimizer 'adamw_8bit' ('stages[0].optimizer.name') needs bitsandbytes, "
                               "which is not installed (pip install 'bitsandbytes>=0.50')")


class PlainSGD:
    """A third-party optimizer: SGD with momentum, recording what it was given."""

    name = "plain_sgd"
    built: list[tuple[OptimizerContext, torch.optim.Optimizer]] = []

    class Options(Options):
        momentum: float = 0.0

    def __init__(self, options: Options):
        self.options = options

    def build(self, context: OptimizerContext) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(context.parameters, lr=context.learning_rate, momentum=self.options.momentum)
        PlainSGD.built.append((context, optimizer))
        return optimizer


class SGDPlugin:
    @aligner.hookimpl
    def register_optimizers(self, register):
        register(PlainSGD)


def test_register_optimizers_adds_an_optimizer_a_stage_trains_with(make_config):
    PlainSGD.built.clear()
    config = make_config("dpo", steps=2, optimizer={"name": "plain_sgd", "momentum": 0.5}, peft=LORA)
    snapshots = Snapshots()
    with temporary_plugin(SGDPlugin(), "sgd_plugin"), temporary_plugin(snapshots, "snapshots"):
        assert any(i.registers.get("optimizer") == ["plain_sgd"] for i in plugin_infos())
        aligner.train(config)
    (context, optimizer), = PlainSGD.built
    assert optimizer.param_groups[0]["momentum"] == 0.5 and context.learning_rate == 1e-3
    assert context.named_parameters and all("lora_" in n for n, _ in context.named_parameters)
    assert optimizer.state and all(snapshots.changed("lora_B"))  # it stepped: momentum buffers exist


def test_an_optimizer_that_builds_something_else_is_a_plugin_error(make_config):
    class NotAnOptimizer(PlainSGD):
        name = "not_an_optimizer"

        def build(self, context):
            return [p for _, p in context.named_parameters]

    class Plugin:
        @aligner.hookimpl
        def register_optimizers(self, register):
            register(NotAnOptimizer)

    with temporary_plugin(Plugin(), "bad"), pytest.raises(PluginError, match=r"optimizer 'not_an_optimizer' of "
                                                                            r"stage 'dpo' built a list, not a torch"):
        aligner.train(make_config("dpo", steps=1, optimizer={"name": "not_an_optimizer"}))


@pytest.mark.parametrize("name", ["lora_fa", "lora_plus"])
def test_lora_optimizers_also_train_a_ppo_value_head(tmp_path, name):
    from .test_online_algorithms import online_config

    algorithm = {"name": "ppo", "ppo_epochs": 1, "mini_batch_size": 4, "sample_every": 1}
    config = online_config(tmp_path, algorithm, steps=2, batch_size=4, peft=LORA, optimizer={"name": name})
    snapshots = Snapshots()
    with temporary_plugin(snapshots, "snapshots"):
        aligner.train(config)
    assert all(snapshots.changed("value_head")) and all(snapshots.changed("lora_B"))
    assert any(snapshots.changed("lora_A")) == (name == "lora_plus")
    assert snapshots.base_changed() == ["value_head.weight", "value_head.bias"]
