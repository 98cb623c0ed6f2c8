"""The plugin system: built-ins through the same hooks, registry checks, run-time registration."""

from __future__ import annotations

import json

import pytest
import torch

import aligner
from aligner.errors import PluginError
from aligner.plugins import get_registry, plugin_infos, temporary_plugin
from aligner.protocols import PREFERENCE, LossOutput, Options


def test_builtins_register_through_the_hooks_and_are_attributed():
    infos = {i.name: i for i in plugin_infos()}
    assert infos["aligner.losses.dpo"].registers == {"loss": ["dpo", "ipo"]}
    assert infos["aligner.losses.dpo"].source == "builtin"
    assert get_registry("loss").entry("sft").plugin == "aligner.losses.sft"
    assert {"frozen_copy", "none"} <= set(get_registry("reference policy").names())
    assert "rule" in get_registry("judge").names()
    assert {"full", "lora"} <= set(get_registry("peft backend").names())


class MarginLoss:
    """A run-time loss: pushes chosen log-probs above rejected ones by a margin."""

    name = "test_margin"
    data_formats = (PREFERENCE,)
    needs_reference = False

    class Options(Options):
        margin: float = 1.0

    def __init__(self, options):
        self.options = options
        self.calls = 0

    def compute(self, inputs):
        MarginLoss.calls = getattr(MarginLoss, "calls", 0) + 1
        chosen, rejected = inputs.policy.pairs()
        gap = chosen.mean_logps() - rejected.mean_logps()
        return LossOutput(torch.relu(self.options.margin - gap).mean(), {"gap": gap.mean().detach()})


class MarginPlugin:
    @aligner.hookimpl
    def register_losses(self, register):
        register(MarginLoss)


def test_a_plugin_registered_at_run_time_trains_without_a_reference_pass(make_config, monkeypatch):
    from aligner.references.frozen_copy import FrozenCopyReference

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference-free loss must not trigger a reference pass")

    monkeypatch.setattr(FrozenCopyReference, "logprobs", forbidden)
    with temporary_plugin(MarginPlugin(), "margin-plugin"):
        assert get_registry("loss").entry("test_margin").plugin == "margin-plugin"
        result = aligner.train(make_config("test_margin", rows=None, steps=2,
                                           losses=[{"name": "test_margin", "margin": 2.0}]))
    assert "train/gap" in result.final_metrics
    assert "test_margin" not in get_registry("loss")


def test_duplicate_names_name_both_plugins():
    from aligner.losses.dpo import DPOLoss

    class Again:
        @aligner.hookimpl
        def register_losses(self, register):
            register(DPOLoss)

    with temporary_plugin(Again(), "copycat"):
        with pytest.raises(PluginError, match=r"loss 'dpo' is registered twice: by plugin 'aligner.losses.dpo' \(built in\) and by plugin 'copycat' \(registered at run time\)"):
            get_registry("loss")


def test_objects_missing_protocol_members_are_rejected_at_registration():
    class Incomplete:
        name = "incomplete"
        data_formats = (PREFERENCE,)
        Options = Options

    class Bad:
        @aligner.hookimpl
        def register_losses(self, register):
            register(Incomplete)

    with temporary_plugin(Bad(), "bad-plugin"):
        with pytest.raises(PluginError, match="plugin 'bad-plugin' .* registered loss .* lacks required member\\(s\\): needs_reference, compute"):
            get_registry("loss")


def test_unknown_hook_name_is_an_error_with_a_suggestion():
    class Typo:
        @aligner.hookimpl
        def register_loses(self, register):
            pass

    with pytest.raises(PluginError, match="implements 'register_loses', which is not an aligner hook.*did you mean 'register_losses'"):
        with temporary_plugin(Typo(), "typo"):
            pass


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(PluginError, match="unknown loss 'dpoo'.*did you mean 'dpo'.*known: .*dpo, .*ipo"):
        get_registry("loss").get("dpoo", where="'stages[0].losses[0]'")


def test_plugins_command_lists_builtins_as_json(capsys):
    from aligner.cli import main

    assert main(["plugins", "--json", "--all"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["aligner.losses.sft"]["registers"] == {"loss": ["sft"]}
    assert listed["aligner.losses.sft"]["version"] == aligner.__version__


def test_lifecycle_hooks_see_every_step_and_can_stop_a_stage(make_config):
    seen: dict[str, list] = {"start": [], "steps": [], "eval": [], "end": []}

    class Observer:
        @aligner.hookimpl
        def on_run_start(self, run):
            seen["start"].append(run.stage.name)

        @aligner.hookimpl
        def on_step_end(self, run, step, metrics):
            seen["steps"].append(step)
            metrics["observer/seen"] = float(step)
            if step == 3:
                run.should_stop = True
                run.stop_reason = "observer"

        @aligner.hookimpl
        def on_evaluate(self, run, step, metrics):
            seen["eval"].append(step)

        @aligner.hookimpl
        def on_run_end(self, run, metrics):
            seen["end"].append(metrics["train/observer/seen"])

    config = make_config("dpo", steps=10, eval_rows=[{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with temporary_plugin(Observer(), "observer"):
        aligner.train(config)
    assert seen == {"start": ["dpo"], "steps": [1, 2, 3], "eval": [0, 3], "end": [3.0]}
