"""Every way a plugin can be wrong gives one clear error naming the plugin, before any model loads.

Installed plugins are simulated with real distributions: a ``*.dist-info`` directory with an
``entry_points.txt`` and a module, in a temporary directory put on ``sys.path``.
"""

from __future__ import annotations

import textwrap

import pytest

from aligner.cli import main
from aligner.errors import PluginError
from aligner.hookspecs import hookimpl
from aligner.plugins import get_registries, register_plugin, reset_plugins, temporary_plugin
from aligner.protocols import PREFERENCE, Options


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv("ALIGNER_SKIP_BROKEN_PLUGINS", raising=False)
    monkeypatch.delenv("ALIGNER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, version, entry_name, module, source)``: a fake installed distribution."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist: str, version: str, entry_name: str, module: str, source: str) -> None:
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[aligner]\n{entry_name} = {module}\n")

    return make


BROKEN = """
import aligner
import a_dependency_that_is_not_installed
"""


def test_a_plugin_that_fails_to_import_names_its_distribution_and_entry_point(install, make_config, tmp_path, capsys):
    install("fake-broken-plugin", "1.2.3", "broken", "broken_aligner_plugin", BROKEN)
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "aligner: error: plugin 'broken' from distribution 'fake-broken-plugin' 1.2.3 (entry point "
        "'broken = broken_aligner_plugin' in group 'aligner') failed to load: ModuleNotFoundError: No module named "
        "'a_dependency_that_is_not_installed'; set ALIGNER_SKIP_BROKEN_PLUGINS=1 to skip it")
    # Training stops the same way, before anything is written.
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(make_config("dpo")))
    assert main(["train", str(config)]) == 2
    assert "fake-broken-plugin" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_broken_plugin_is_skipped_with_a_warning_when_the_user_asks(install, monkeypatch, capsys):
    install("fake-broken-plugin", "1.2.3", "broken", "broken_aligner_plugin", BROKEN)
    monkeypatch.setenv("ALIGNER_SKIP_BROKEN_PLUGINS", "1")
    with pytest.warns(UserWarning, match=r"plugin 'broken' from distribution 'fake-broken-plugin' .*; skipped "
                                         r"\(ALIGNER_SKIP_BROKEN_PLUGINS is set\)"):
        assert main(["plugins", "--all"]) == 0
    out = capsys.readouterr().out
    assert "aligner.losses.dpo (builtin" in out and "broken" not in out


DUPLICATE_DPO = """
import aligner
from aligner.protocols import Options

class MyDPO:
    name = "dpo"
    data_formats = ("preference",)
    needs_reference = True
    class Options(Options):
        pass
    def __init__(self, options):
        self.options = options
    def compute(self, inputs):
        raise NotImplementedError

@aligner.hookimpl
def register_losses(register):
    register(MyDPO)
"""


def test_a_duplicate_name_names_both_plugins(install, capsys):
    install("fake-dpo-plugin", "0.3.0", "my_dpo", "my_dpo_plugin", DUPLICATE_DPO)
    assert main(["plugins"]) == 2
    assert capsys.readouterr().err.strip() == (
        "aligner: error: loss 'dpo' is registered twice: by plugin 'aligner.losses.dpo' (built in) and by "
        "plugin 'my_dpo' (distribution fake-dpo-plugin 0.3.0)")


def test_two_plugins_with_the_same_name_are_both_named(install):
    install("fake-first", "1.0", "shared", "first_plugin", "import aligner\n")
    install("fake-second", "2.0", "shared", "second_plugin", "import aligner\n")
    with pytest.raises(PluginError) as info:
        get_registries()
    message = str(info.value)
    assert message.startswith("two plugins are named 'shared': plugin 'shared' (distribution fake-")
    assert "fake-first 1.0" in message and "fake-second 2.0" in message


class _Loss:
    name = "half_done"
    data_formats = (PREFERENCE,)
    needs_reference = False

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options

    def compute(self, inputs):
        raise NotImplementedError


def _variant(**changes) -> type:
    return type("Variant", (_Loss,), changes)


class _NoCompute:
    name = "half_done"
    data_formats = (PREFERENCE,)
    needs_reference = False

    class Options(Options):
        pass


class _JudgeWithoutScore:
    name = "mute"

    class Options(Options):
        pass


class _AlgorithmWithoutStep:
    """An algorithm written without subclassing ``aligner.algorithms.Algorithm``: every method is missing."""

    name = "idle"
    data_formats = ("prompt",)

    class Options(Options):
        pass


class _EstimatorWithoutEstimate:
    name = "guess"
    needs_critic = False

    class Options(Options):
        pass


class _EngineWithoutGenerate:
    name = "silent"

    class Options(Options):
        pass


class _OptimizerWithoutBuild:
    name = "idle_optimizer"

    class Options(Options):
        pass


@pytest.mark.parametrize(("kind_hook", "obj", "message"), [
    ("register_algorithms", _AlgorithmWithoutStep,
     "plugin 'incomplete' (registered at run time) registered algorithm 'idle' which lacks required member(s): "
     "check_stage, needs_reference, generation_tokens, setup, train_step, evaluate, state_dict, load_state_dict, "
     "load_weights, policy_of, close (see aligner.protocols.Algorithm; subclass aligner.algorithms.Algorithm for the "
     "defaults)"),
    ("register_advantage_estimators", _EstimatorWithoutEstimate,
     "plugin 'incomplete' (registered at run time) registered advantage estimator 'guess' which lacks required "
     "member(s): estimate (see aligner.protocols.AdvantageEstimator)"),
    ("register_generation_engines", _EngineWithoutGenerate,
     "plugin 'incomplete' (registered at run time) registered generation engine 'silent' which lacks required "
     "member(s): check_stage, generate, close (see aligner.protocols.GenerationEngine; subclass "
     "aligner.online.engines.GenerationEngine for the defaults)"),
    ("register_optimizers", _OptimizerWithoutBuild,
     "plugin 'incomplete' (registered at run time) registered optimizer 'idle_optimizer' which lacks required "
     "member(s): build (see aligner.protocols.Optimizer)"),
    ("register_losses", _NoCompute,
     "plugin 'incomplete' (registered at run time) registered loss 'half_done' which lacks required member(s): "
     "compute (see aligner.protocols.Loss)"),
    ("register_judges", _JudgeWithoutScore,
     "plugin 'incomplete' (registered at run time) registered judge 'mute' which lacks required member(s): "
     "score (see aligner.protocols.Judge)"),
    ("register_losses", _variant(compute=None),
     "plugin 'incomplete' (registered at run time) registered loss 'half_done' whose member(s) compute must be methods"),
    ("register_losses", _variant(Options=dict),
     "plugin 'incomplete' (registered at run time) registered loss 'half_done' whose Options is not a pydantic model"),
    ("register_losses", _variant(data_formats=("pairs",)),
     "plugin 'incomplete' (registered at run time) registered loss 'half_done' with invalid data_formats ('pairs',); "
     "valid formats: sft, preference, unpaired, prompt"),
])
def test_an_object_that_does_not_satisfy_its_protocol_is_rejected_at_registration(kind_hook, obj, message):
    def hook(register):
        register(obj)

    plugin = type("Plugin", (), {kind_hook: staticmethod(hookimpl(hook))})()
    with temporary_plugin(plugin, name="incomplete"), pytest.raises(PluginError) as info:
        get_registries()
    assert str(info.value) == message


def test_a_protocol_violation_stops_training_before_the_model_is_loaded(make_config, tmp_path):
    import aligner

    class Plugin:
        @hookimpl
        def register_losses(self, register):
            register(_NoCompute)

    with temporary_plugin(Plugin(), name="incomplete"), pytest.raises(PluginError, match="lacks required member"):
        aligner.train(make_config("dpo"))  # the stage does not even use the bad loss
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("typo", "suggestion"), [
    ("on_step_ned", "on_step_end"), ("register_loss", "register_losses"), ("on_checkpoint_save", "on_checkpoint_saved"),
])
def test_implementing_a_hook_that_does_not_exist_is_an_error_with_a_suggestion(typo, suggestion):
    def impl(run):
        pass

    plugin = type("Plugin", (), {typo: staticmethod(hookimpl(impl))})()
    with pytest.raises(PluginError) as info:
        register_plugin(plugin, name="typo")
    assert str(info.value) == (f"plugin 'typo' (registered at run time) implements '{typo}', which is not an aligner "
                               f"hook (did you mean '{suggestion}'?)")


def test_a_hook_with_wrong_argument_names_is_rejected(install, capsys):
    install("fake-args", "0.1", "args", "args_plugin", """
        import aligner

        @aligner.hookimpl
        def on_step_end(run, stepp, metrics):
            pass
    """)
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aligner: error: plugin 'args' (distribution fake-args 0.1) is invalid: ")
    assert "'stepp'" in err and err.count("\n") == 1


def test_a_registration_hook_that_raises_names_the_plugin_and_hook():
    class Plugin:
        @hookimpl
        def register_judges(self, register):
            raise RuntimeError("cannot reach the model server")

    with temporary_plugin(Plugin(), name="flaky"), pytest.raises(PluginError) as info:
        get_registries()
    assert str(info.value) == ("plugin 'flaky' (registered at run time) failed in register_judges: "
                               "RuntimeError: cannot reach the model server")


def test_an_unknown_plugin_name_lists_the_known_ones(make_config):
    import aligner

    config = make_config("dpo")
    config["stages"][0]["losses"] = [{"name": "dpoo"}]
    with pytest.raises(PluginError) as info:
        aligner.train(config)
    message = str(info.value)
    assert message.startswith("unknown loss 'dpoo' at 'stages[0].losses[0]'")
    assert "(did you mean 'dpo'?); known: dpo, " in message and ", ipo, " in message and ", sft" in message
    assert "is the plugin that provides it installed?" in message

