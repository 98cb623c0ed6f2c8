"""The ``ema`` reference (TR-DPO): it follows the policy every ``sync_steps`` updates, its state is in
every checkpoint, and a killed-and-resumed run equals an uninterrupted one, reference included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import aligner
from aligner.errors import ConfigError
from aligner.modeling.logprobs import completion_logprobs
from aligner.plugins import temporary_plugin
from aligner.training.checkpoint_manifest import verify_checkpoint
from aligner.training.reference_state import STATE_FILE

from .conftest import preference_rows
from .test_resume import final_weights, run_interrupted_then_resumed

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def trainable(run) -> dict[str, torch.Tensor]:
    """The policy's trainable weights now (the names the reference uses)."""
    policy = run.stage.algorithm.policy_of(run.accelerator.unwrap_model(run.model))
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


class Watch:
    """Records the policy's trainable weights at the start and after every step, the step losses, and
    the reference (and, at ``probe_step``, the reference's and the policy's log-probs of a batch)."""

    def __init__(self, probe_step: int | None = None):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.losses: list[float] = []
        self.reference = None
        self.probe_step = probe_step
        self.probe: dict[str, object] = {}

    @aligner.hookimpl
    def on_run_start(self, run):
        self.reference = run.stage.reference
        self.weights[run.step] = trainable(run)

    @aligner.hookimpl
    def on_step_end(self, run, step, metrics):
        self.losses.append(float(metrics["loss"]))
        self.weights[step] = trainable(run)
        if step == self.probe_step:
            self.probe = probe(run)


def probe(run) -> dict[str, object]:
    """The reference's log-probs of a batch, the policy's own (eval mode) and what the swap left behind."""
    from aligner.data.batching import stage_collate

    stage = run.stage
    batch = stage_collate(stage, run.tokenizer.pad_token_id)(stage.train_data.examples[:4])
    policy = stage.algorithm.policy_of(run.accelerator.unwrap_model(run.model))
    before = trainable(run)
    reference = stage.reference.logprobs(batch, token_level=True)
    after = trainable(run)
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        own = completion_logprobs(policy, batch, token_level=True)
    policy.train(was_training)
    return {"reference": reference, "policy": own, "restored": all(torch.equal(before[k], after[k]) for k in before),
            "training": was_training}


def train_watched(config, watch=None):
    watch = watch or Watch()
    with temporary_plugin(watch, "watch"):
        result = aligner.train(config)
    return watch, result


def ema_config(make_config, alpha, sync_steps, steps, **stage):
    return make_config("dpo", steps=steps, reference={"name": "ema", "alpha": alpha, "sync_steps": sync_steps},
                       train={"max_steps": steps, "batch_size": 4, "learning_rate": 1e-2}, **stage)


def test_soft_sync_equals_the_hand_computed_moving_average(make_config):
    # alpha 0.5, tau 2, 5 steps (one update each): syncs after updates 2 and 4, none after 5.
    watch, _ = train_watched(ema_config(make_config, 0.5, 2, 5, peft=LORA))
    w = watch.weights
    expected = {}
    for name, start in w[0].items():
        after_2 = 0.5 * w[2][name] + 0.5 * start
        expected[name] = 0.5 * w[4][name] + 0.5 * after_2
    reference = watch.reference
    assert set(reference.weights) == set(expected)
    assert all("lora_" in name for name in expected)  # with LoRA only the adapter weights are held
    for name, value in expected.items():
        torch.testing.assert_close(reference.weights[name], value, rtol=0, atol=1e-6)
    assert reference.syncs == 2
    # The policy moved on after update 4: the reference is not the policy.
    assert any(not torch.equal(reference.weights[n], w[5][n]) for n in expected)


def test_hard_sync_makes_the_reference_the_policy_of_the_sync_step(make_config):
    # Full fine-tuning: every parameter is followed. alpha 1 (TR-DPO hard), tau 2: sync at update 2.
    watch, _ = train_watched(ema_config(make_config, 1.0, 2, 3), Watch(probe_step=2))
    w, reference = watch.weights, watch.reference
    assert set(reference.weights) == set(w[0])
    assert all(torch.equal(reference.weights[n], w[2][n]) for n in w[2])  # exactly the step-2 policy
    assert any(not torch.equal(w[2][n], w[3][n]) for n in w[3])  # and the policy moved on at step 3
    # Right after the sync, the reference pass is the policy's own forward, bit for bit, per token too;
    # the live weights and train mode are put back after the pass.
    probe = watch.probe
    assert torch.equal(probe["reference"].logps, probe["policy"].logps)
    assert torch.equal(probe["reference"].token_logps, probe["policy"].token_logps)
    assert probe["restored"] and probe["training"]


@pytest.mark.parametrize("peft,other", [(None, "frozen_copy"), (LORA, "disabled_adapter")])
def test_before_any_sync_the_reference_equals_the_starting_policy(make_config, peft, other):
    extra = {"peft": peft} if peft else {}
    ema, _ = train_watched(ema_config(make_config, 0.5, 100, 3, **extra))
    config = make_config("dpo", steps=3, reference={"name": other},
                         train={"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2}, **extra)
    config["output_dir"] += "-other"
    fixed, _ = train_watched(config)
    assert ema.reference.syncs == 0
    assert ema.losses == pytest.approx(fixed.losses, abs=1e-6)


def test_killed_and_resumed_run_equals_the_uninterrupted_one_reference_included(make_config, tmp_path):
    rows = preference_rows(24)
    train = {"max_steps": 7, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
             "save_every": 2, "lr_scheduler": "cosine", "warmup_ratio": 0.2}
    config = make_config("dpo", rows=rows, train=train, reference={"name": "ema", "alpha": 0.5, "sync_steps": 2})
    config["output_dir"] = str(tmp_path / "straight")
    straight = aligner.train(config)
    config["output_dir"] = str(tmp_path / "resumed")
    # Killed at step 3 (one sync done, its checkpoint written on SIGTERM), resumed to step 7.
    resumed = run_interrupted_then_resumed(config, kill_at=3)

    def losses(result):
        records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert losses(straight) == losses(resumed)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = {name: r.output_dir / "dpo" / "checkpoints" / "step-6" for name, r in
                  (("straight", straight), ("resumed", resumed))}
    ema = {name: load_file(str(d / STATE_FILE)) for name, d in checkpoint.items()}
    assert ema["straight"].keys() == ema["resumed"].keys() and ema["straight"]
    assert all(torch.equal(ema["straight"][k], ema["resumed"][k]) for k in ema["straight"])
    for directory in checkpoint.values():
        state = json.loads((directory / "trainer_state.json").read_text())["reference"]
        assert state["state"]["syncs"] == 3 and state["state"]["alpha"] == 0.5
        assert verify_checkpoint(directory).status == "ok"  # the manifest covers the reference's file


def test_a_checkpoint_without_ema_state_is_refused_on_resume(make_config, tmp_path):
    config = make_config("dpo", train={"max_steps": 3, "batch_size": 4, "save_every": 2},
                         reference={"name": "frozen_copy"})
    config["output_dir"] = str(tmp_path / "run")
    from .test_resume import KillAt

    with temporary_plugin(KillAt(2), "killer"), pytest.raises(aligner.errors.Interrupted):
        aligner.train(config)
    config["stages"][0]["reference"] = {"name": "ema", "sync_steps": 1}
    with pytest.raises(aligner.errors.AlignerError, match="holds no ema reference state"):
        aligner.train(config, resume=True)


def test_mezo_updates_are_followed(make_config):
    config = ema_config(make_config, 1.0, 1, 2, algorithm={"name": "mezo"})
    watch, _ = train_watched(config)
    assert watch.reference.syncs == 2
    assert all(torch.equal(watch.reference.weights[n], watch.weights[2][n]) for n in watch.weights[2])


@pytest.mark.parametrize("options,key", [
    ({"alpha": 0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"),
    ({"sync_steps": 0}, "sync_steps"), ({"sync_step": 4}, "sync_step"),
])
def test_bad_options_are_config_errors_naming_the_key(make_config, options, key):
    config = make_config("dpo", reference={"name": "ema", **options})
    with pytest.raises(ConfigError, match=rf"stages\[0\]\.reference\.{key}"):
        aligner.train(config)


def test_sharded_launch_is_refused_naming_the_key(make_config, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    from aligner.protocols import ReferenceContext
    from aligner.references.ema import EMAReference

    with pytest.raises(ConfigError, match=r"reference 'ema' \('stages\[\?\]\.reference'\).*not FSDP"):
        EMAReference().setup(ReferenceContext(policy=torch.nn.Linear(2, 2), logprobs_fn=None, peft_backend=None,
                                              device=torch.device("cpu"), run_dir="."))


def test_ppo_updates_each_count_and_only_the_policy_is_followed(tmp_path):
    from .test_ppo import _ppo_config

    # batch 8, mini-batches of 4, 2 PPO epochs: 4 updates per step; tau 4 syncs at the end of each step.
    config = _ppo_config(tmp_path, steps=2, peft=LORA)
    config["stages"][0]["reference"] = {"name": "ema", "alpha": 1.0, "sync_steps": 4}
    watch, _ = train_watched(config)
    reference, w = watch.reference, watch.weights
    assert reference.syncs == 2
    assert set(reference.weights) == set(w[2]) and not any("value_head" in n for n in reference.weights)
    assert all(torch.equal(reference.weights[n], w[2][n]) for n in w[2])


def test_the_copy_follows_the_policy_when_the_run_moves_or_casts_it_after_setup():
    """The run moves the model to its device after the reference's setup (accelerate's prepare): the copy
    must follow it (here a cast to float64 stands in for ``.to("cuda")``, the same code path)."""
    from aligner.protocols import ReferenceContext, ReferenceStep
    from aligner.references.ema import EMAReference

    torch.manual_seed(0)
    policy = torch.nn.Linear(3, 2)
    start = policy.weight.detach().clone()
    reference = EMAReference(EMAReference.Options(alpha=0.5, sync_steps=1))
    reference.setup(ReferenceContext(policy=policy, logprobs_fn=None, peft_backend=None,
                                     device=torch.device("cpu"), run_dir="."))
    policy.to(torch.float64)
    with torch.no_grad():
        policy.weight.add_(1.0)
    with reference.swapped_in() as swapped:
        out = swapped(torch.ones(1, 3, dtype=torch.float64))  # would fail with a float32 copy
        assert torch.equal(swapped.weight, start.to(torch.float64))
    assert out.dtype == torch.float64 and policy.weight.dtype == torch.float64
    reference.after_optimizer_step(ReferenceStep(policy=policy, updates=1))
    assert torch.allclose(reference.weights["weight"], start.double() + 0.5)
