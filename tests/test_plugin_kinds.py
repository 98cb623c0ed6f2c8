"""The kinds table at work: optional members get their declared defaults when a class registers, and
``reference: auto`` asks the registered reference policies (so a third-party one can win)."""

from __future__ import annotations

import pytest
import torch

import aligner
from aligner.errors import ConfigError, PluginError
from aligner.kinds import KINDS, get_kind
from aligner.plugins import get_registry, temporary_plugin
from aligner.protocols import PREFERENCE, LossOutput, Options, ReferenceNeeds
from aligner.references import auto_reference, choose_reference
from tests.conftest import write_jsonl


class BareLoss:
    """A third-party loss with only the required members: no optional one, no base class."""

    name = "bare_gap"
    data_formats = (PREFERENCE,)
    needs_reference = False

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options

    def compute(self, inputs):
        chosen, rejected = inputs.policy.pairs()
        gap = chosen.mean_logps() - rejected.mean_logps()
        return LossOutput(torch.nn.functional.softplus(-gap).mean(), {"gap": gap.mean().detach()})


class BareBackend:
    """A third-party PEFT backend with only ``name``, ``Options`` and ``apply``."""

    name = "bare_full"

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options

    def apply(self, model):
        return model.requires_grad_(True)


class BarePlugin:
    @aligner.hookimpl
    def register_losses(self, register):
        register(BareLoss)

    @aligner.hookimpl
    def register_peft_backends(self, register):
        register(BareBackend)


def test_a_third_party_loss_without_the_optional_members_gets_the_defaults_and_trains(make_config):
    with temporary_plugin(BarePlugin(), "bare"):
        assert get_registry("loss").get("bare_gap") is BareLoss
        for member in get_kind("loss").defaults:
            assert member in vars(BareLoss), f"{member} was not filled"
        assert (BareLoss.needs_token_logps, BareLoss.needs_kl_completions, BareLoss.forward_kind) == (False, False,
                                                                                                      "logprobs")
        assert BareLoss.preference_completions == ("chosen", "rejected") and BareLoss.requires == ()
        loss = BareLoss(BareLoss.Options())
        assert loss.check_stage(object()) is None
        result = aligner.train(make_config("bare_gap", steps=2, losses=[{"name": "bare_gap"}],
                                           peft={"name": "bare_full"}))
    assert "train/gap" in result.final_metrics


def test_a_third_party_peft_backend_gets_the_default_after_step_release_and_flags():
    with temporary_plugin(BarePlugin(), "bare"):
        get_registry("peft backend")
        backend = BareBackend(BareBackend.Options())
        model = torch.nn.Linear(2, 2)
        assert backend.after_optimizer_step(model, 1) is None
        assert backend.release(model) is model
        assert BareBackend.adds_adapters is None and BareBackend.requires == ()


def test_declared_members_are_kept_and_built_ins_read_as_declared():
    from aligner.losses.kto import KTOLoss
    from aligner.losses.reward_model import RewardModelLoss
    from aligner.peft_backends.lora import LoRABackend

    get_registry("loss")
    assert KTOLoss.needs_kl_completions is True and RewardModelLoss.forward_kind == "reward"
    assert LoRABackend.adds_adapters is True and LoRABackend.release is not get_kind("peft backend").defaults["release"]
    assert get_registry("judge").get("rule").compare is None
    assert callable(get_registry("judge").get("llm").compare)


def test_an_optional_method_that_is_not_callable_is_refused_at_registration():
    class Odd(BareLoss):
        name = "odd"
        check_stage = "yes"

    class OddPlugin:
        @aligner.hookimpl
        def register_losses(self, register):
            register(Odd)

    with temporary_plugin(OddPlugin(), "odd-plugin"):
        with pytest.raises(PluginError, match="registered loss 'odd' whose member\\(s\\) check_stage must be methods"):
            get_registry("loss")


def test_an_optional_method_set_to_none_means_absent_and_gets_the_default():
    """Before the defaults were declared, plugins wrote ``check_stage = None`` for "none": they still load."""
    class Explicit(BareLoss):
        name = "explicit_none"
        check_stage = None

    class ExplicitPlugin:
        @aligner.hookimpl
        def register_losses(self, register):
            register(Explicit)

    with temporary_plugin(ExplicitPlugin(), "explicit-plugin"):
        loss = get_registry("loss").get("explicit_none")
        assert callable(loss.check_stage) and loss.check_stage(loss(loss.Options()), None) is None


def test_every_kind_fills_its_defaults_on_a_bare_class():
    for kind in KINDS:
        bare = type("Bare", (), {m: (lambda self, *a: None) for m in kind.methods})
        assert kind.fill_defaults(bare) == list(kind.defaults)
        assert kind.fill_defaults(bare) == []  # a second time: nothing left to fill


# --- reference: auto ---------------------------------------------------------------------------------


class PreferenceCache:
    """A third-party reference that wants to serve every offline preference stage."""

    name = "preference_cache"
    auto_priority = 50

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options

    @classmethod
    def usable_for(cls, needs):
        return needs.needs_reference and needs.offline and needs.data_format == PREFERENCE

    def setup(self, context):
        self.policy = context.policy

    def logprobs(self, batch):
        raise AssertionError("not run in these tests")


class Unranked(PreferenceCache):
    """Usable everywhere, but without an ``auto_priority``: only a config naming it uses it."""

    name = "unranked"
    auto_priority = None

    @classmethod
    def usable_for(cls, needs):
        return True


class ReferencePlugin:
    @aligner.hookimpl
    def register_reference_policies(self, register):
        register(PreferenceCache)
        register(Unranked)


def test_the_built_in_auto_choice_is_what_the_references_declare():
    assert auto_reference(ReferenceNeeds(False, PREFERENCE)) == "none"
    assert auto_reference(ReferenceNeeds(True, PREFERENCE)) == "cached"
    assert auto_reference(ReferenceNeeds(True, "prompt", peft_adds_adapters=True)) == "disabled_adapter"
    assert auto_reference(ReferenceNeeds(True, "unpaired", scores_extra_sequences=True)) == "frozen_copy"
    # a backend's declaration is read from the registry when the caller does not give it
    assert choose_reference("auto", True, "prompt", "bitfit") == "frozen_copy"
    assert choose_reference("auto", True, "prompt", "qlora") == "disabled_adapter"


def test_a_third_party_reference_registered_in_a_test_can_win_auto(make_config, tmp_path):
    from aligner.config import load_config
    from aligner.training.stages import prepare_stages

    with temporary_plugin(ReferencePlugin(), "reference-plugin"):
        assert choose_reference("auto", True, PREFERENCE, "full") == "preference_cache"
        # where it declines, the built-ins still decide; an unranked reference never wins
        assert choose_reference("auto", True, "prompt", "full") == "frozen_copy"
        assert choose_reference("auto", False, PREFERENCE, "full") == "none"
        assert choose_reference("unranked", True, PREFERENCE, "full") == "unranked"
        (stage,) = prepare_stages(load_config(make_config("dpo")))
        assert stage.reference_name == "preference_cache" and isinstance(stage.reference, PreferenceCache)
    assert choose_reference("auto", True, PREFERENCE, "full") == "cached"


def test_auto_with_no_usable_reference_is_a_config_error(monkeypatch):
    from aligner.references.frozen_copy import FrozenCopyReference

    get_registry("reference policy")
    monkeypatch.setattr(FrozenCopyReference, "auto_priority", None)
    with pytest.raises(ConfigError, match="no registered reference policy can serve 'reference: auto'"):
        choose_reference("auto", True, "prompt", "full")


def test_pairwise_label_refuses_a_judge_without_compare(tmp_path):
    from aligner.commands.label import label, load_label_config

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."}])
    config = load_label_config({"output": str(tmp_path / "out.jsonl"), "model": {"tiny": {}}, "tokenizer": "builtin",
                                "prompts": str(prompts), "pairwise": True,
                                "judge": {"name": "rule", "regex": "hi"}})
    with pytest.raises(ConfigError, match="judge 'rule' has no pairwise 'compare'; set 'pairwise: false'"):
        label(config)


def test_a_subclass_of_a_built_in_reference_does_not_inherit_its_place_in_auto():
    from aligner.protocols import ReferenceNeeds
    from aligner.references import auto_reference
    from aligner.references.no_reference import NoReference

    class LoggedNone(NoReference):
        name = "a_logged_none"  # sorts before "none": it would win a tie

    class LoggedPlugin:
        @aligner.hookimpl
        def register_reference_policies(self, register):
            register(LoggedNone)

    with temporary_plugin(LoggedPlugin(), "logged-none"):
        assert auto_reference(ReferenceNeeds(needs_reference=False)) == "none"
