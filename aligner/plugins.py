"""The plugin manager: loads built-in and installed plugins and builds the registries from them.

Loading is lazy: nothing is imported until a registry is first needed. Built-ins are registered
through the same ``register_*`` hooks as third-party plugins; the only difference is that their
modules are listed here instead of in an entry point.

Environment variables:
- ``ALIGNER_DISABLE_PLUGIN_AUTOLOAD=1``: do not load plugins from the ``aligner`` entry-point group.
- ``ALIGNER_SKIP_BROKEN_PLUGINS=1``: a plugin that fails to import is skipped with a warning
  instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from aligner import hookspecs
from aligner.errors import AlignerError, PluginError, suggest
from aligner.kinds import KINDS
from aligner.registry import Registry
from aligner.version import __version__

ENTRY_POINT_GROUP = "aligner"

BUILTIN_PLUGINS = (
    "aligner.losses.sft",
    "aligner.losses.dpo",
    "aligner.losses.dpo_variants",
    "aligner.losses.kto",
    "aligner.losses.orpo",
    "aligner.losses.reward_model",
    "aligner.references.frozen_copy",
    "aligner.references.no_reference",
    "aligner.references.disabled_adapter",
    "aligner.references.cached",
    "aligner.references.ema",
    "aligner.judges.rule",
    "aligner.judges.reward_model",
    "aligner.judges.llm",
    "aligner.peft_backends.full",
    "aligner.peft_backends.lora",
    "aligner.peft_backends.qlora",
    "aligner.peft_backends.peft_generic",
    "aligner.peft_backends.bitfit",
    "aligner.trackers.wandb_tracker",
    "aligner.trackers.tensorboard_tracker",
    "aligner.commands.push",
    "aligner.callbacks.early_stopping",
    "aligner.callbacks.extra_metrics",
    "aligner.algorithms.offline",
    "aligner.algorithms.ppo",
    "aligner.algorithms.grpo",
    "aligner.algorithms.rloo",
    "aligner.algorithms.reinforce_pp",
    "aligner.algorithms.online_dpo",
    "aligner.algorithms.mezo",
    "aligner.online.advantages.gae",
    "aligner.online.advantages.group_relative",
    "aligner.online.advantages.rloo",
    "aligner.online.advantages.reinforce_pp",
    "aligner.online.engines.hf",
    "aligner.online.engines.openai_server",
    "aligner.online.engines.vllm",
    "aligner.optimizers.adamw",
    "aligner.optimizers.adamw_8bit",
    "aligner.optimizers.lora_plus",
    "aligner.optimizers.lora_fa",
)


@dataclass
class PluginInfo:
    """Where a plugin came from: ``builtin``, an entry point of a distribution, or run-time."""

    name: str
    source: str
    distribution: str | None = None
    version: str | None = None
    registers: dict[str, list[str]] = field(default_factory=dict)


class _State:
    def __init__(self) -> None:
        self.pm: pluggy.PluginManager | None = None
        self.infos: dict[str, PluginInfo] = {}
        self.registries: dict[str, Registry] | None = None


_state = _State()


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("aligner")
    pm.add_hookspecs(hookspecs)
    return pm


def _check_hook_names(plugin: Any, plugin_name: str) -> None:
    """Reject functions marked as hook implementations whose name is not a hook.

    pluggy itself would accept them silently (as hooks nobody calls), so a typo such as
    ``on_step_ned`` would never run; ``plugin_name`` is the plugin as messages describe it.
    """
    specs = [n for n, f in inspect.getmembers(hookspecs) if inspect.isfunction(f) and hasattr(f, "aligner_spec")]
    for attr, value in inspect.getmembers(plugin):
        if callable(value) and hasattr(value, "aligner_impl") and attr not in specs:
            raise PluginError(
                f"{plugin_name} implements '{attr}', which is not an aligner hook{suggest(attr, specs)}"
            )


def _describe(info: PluginInfo) -> str:
    if info.source == "builtin":
        return f"plugin '{info.name}' (built in)"
    if info.source == "entry point":
        return f"plugin '{info.name}' (distribution {info.distribution} {info.version or ''})".replace(" )", ")")
    return f"plugin '{info.name}' (registered at run time)"


def describe_plugin(name: str) -> str:
    """``plugin 'simpo' (distribution aligner-simpo 0.1.0)``: a plugin as error messages name it."""
    info = _state.infos.get(name)
    return _describe(info) if info is not None else f"plugin '{name}'"


def _register(pm: pluggy.PluginManager, plugin: Any, info: PluginInfo) -> None:
    _check_hook_names(plugin, _describe(info))
    if pm.has_plugin(info.name):
        raise PluginError(
            f"two plugins are named '{info.name}': {describe_plugin(info.name)} and {_describe(info)}"
        )
    try:
        pm.register(plugin, name=info.name)
    except pluggy.PluginValidationError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise PluginError(f"{_describe(info)} is invalid: {detail}") from exc
    _state.infos[info.name] = info


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    skip_broken = os.environ.get("ALIGNER_SKIP_BROKEN_PLUGINS", "") not in ("", "0")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "unknown distribution"
        version = dist.version if dist is not None else None
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
            message = (
                f"plugin '{ep.name}' from distribution '{dist_name}'{f' {version}' if version else ''} "
                f"(entry point '{ep.name} = {ep.value}' in group '{ENTRY_POINT_GROUP}') failed to load: "
                f"{type(exc).__name__}: {exc}"
            )
            if skip_broken:
                warnings.warn(message + "; skipped (ALIGNER_SKIP_BROKEN_PLUGINS is set)", stacklevel=2)
                continue
            raise PluginError(message + "; set ALIGNER_SKIP_BROKEN_PLUGINS=1 to skip it") from exc
        _register(pm, plugin, PluginInfo(ep.name, "entry point", dist_name, version))


def load_plugins() -> pluggy.PluginManager:
    """Load built-in and installed plugins once and return the plugin manager."""
    if _state.pm is not None:
        return _state.pm
    pm = _new_manager()
    _state.pm = pm
    try:
        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            _register(pm, module, PluginInfo(module_name, "builtin", "aligner-trainer", __version__))
        if os.environ.get("ALIGNER_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0"):
            _load_entry_points(pm)
    except BaseException:
        reset_plugins()
        raise
    return pm


def reset_plugins() -> None:
    """Forget every loaded plugin and registry; the next use loads them again."""
    _state.pm = None
    _state.infos = {}
    _state.registries = None


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object or module at run time (tests, notebooks); returns its name."""
    pm = load_plugins()
    plugin_name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    _register(pm, plugin, PluginInfo(plugin_name, "runtime"))
    _state.registries = None
    return plugin_name


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with ``register_plugin``."""
    pm = load_plugins()
    pm.unregister(name=name)
    _state.infos.pop(name, None)
    _state.registries = None


@contextlib.contextmanager
def temporary_plugin(plugin: Any, name: str | None = None) -> Iterator[str]:
    """Register ``plugin`` for the duration of a ``with`` block."""
    plugin_name = register_plugin(plugin, name)
    try:
        yield plugin_name
    finally:
        unregister_plugin(plugin_name)


def get_registries() -> dict[str, Registry]:
    """Build (once) and return the registries, keyed by kind (the names in ``aligner.kinds.KINDS``)."""
    if _state.registries is not None:
        return _state.registries
    pm = load_plugins()
    registries = {kind.name: Registry(kind, describe=describe_plugin) for kind in KINDS}
    for info in _state.infos.values():
        info.registers = {}
    for kind in KINDS:
        hook_name = kind.hook
        hook = getattr(pm.hook, hook_name)
        # Call each implementation on its own so every registered object is tied to its plugin, in
        # registration order (built-ins, then entry points, then run time): a clash names the newcomer last.
        for impl in hook.get_hookimpls():
            registry = registries[kind.name]
            plugin_name = impl.plugin_name

            def register(obj: Any, _registry: Registry = registry, _plugin: str = plugin_name) -> None:
                _registry.add(obj, _plugin)
                _state.infos[_plugin].registers.setdefault(_registry.kind, []).append(obj.name)

            try:
                impl.function(register=register)
            except AlignerError:
                raise
            except Exception as exc:  # a bug in the plugin: say whose, keep the traceback for --debug
                raise PluginError(f"{describe_plugin(plugin_name)} failed in {hook_name}: "
                                  f"{type(exc).__name__}: {exc}") from exc
    _state.registries = registries
    return registries


def get_registry(kind: str) -> Registry:
    """One registry, by the kind's name in ``aligner.kinds.KINDS``: ``"loss"``, ``"reference policy"``,
    ``"judge"``, ``"peft backend"``, ``"callback"``, ``"algorithm"``, ``"advantage estimator"``,
    ``"generation engine"`` or ``"optimizer"``."""
    return get_registries()[kind]


def build_from_mapping(kind: str, choice: Any, label: str, example: str) -> Any:
    """Build a plugin of ``kind`` from a config mapping ``{name: ..., **options}``.

    Every problem is an ``OptionProblems`` (a ``ValueError``) listing each bad key below the mapping;
    raised inside a pydantic validator, the config loader reports each with its full key path, file,
    line and a suggestion. Its ``str()`` names the key as ``<label>.<key>``; ``example`` is a valid
    mapping shown when ``choice`` is not one.
    """
    from pydantic import ValidationError

    from aligner.config.loading import option_problems
    from aligner.errors import OptionProblem, OptionProblems

    if not isinstance(choice, dict) or not isinstance(choice.get("name"), str):
        article = "an" if label[0] in "aeiou" else "a"
        raise OptionProblems([OptionProblem((), f"{article} {label} is a mapping with a 'name' key, e.g. {example}")],
                             label=label)
    try:
        cls = get_registry(kind).get(choice["name"], where=OptionProblem.AT.removeprefix(" at "))
    except AlignerError as exc:
        raise OptionProblems([OptionProblem((), str(exc), kind="plugin")], label=label) from None
    try:
        return cls(cls.Options.model_validate({k: v for k, v in choice.items() if k != "name"}))
    except ValidationError as exc:
        raise OptionProblems(option_problems(exc, cls.Options, choice["name"]), label=label) from None
    except AlignerError as exc:
        raise OptionProblems([OptionProblem((), f"{label} '{choice['name']}': {exc}")], label=label) from None


def plugin_infos() -> list[PluginInfo]:
    """Every loaded plugin with its source, version and what it registered."""
    get_registries()
    return list(_state.infos.values())


def call_hook(name: str, **kwargs: Any) -> None:
    """Call a lifecycle hook on every plugin implementing it."""
    getattr(load_plugins().hook, name)(**kwargs)
