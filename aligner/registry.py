"""Name -> class registries that check what plugins register and remember who registered it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from aligner.errors import PluginError, suggest
from aligner.protocols import DATA_FORMATS, LIFECYCLE_HOOKS, REQUIRED_MEMBERS, REQUIREMENT_ROLES, Requires

# Required members that are values rather than methods.
DATA_MEMBERS = frozenset({"name", "data_formats", "needs_reference", "needs_critic", "Options"})
# The protocol class in aligner.protocols that documents each kind.
PROTOCOL_NAMES = {"loss": "Loss", "reference policy": "ReferencePolicy", "judge": "Judge",
                  "peft backend": "PeftBackend", "callback": "Callback", "algorithm": "Algorithm",
                  "advantage estimator": "AdvantageEstimator", "generation engine": "GenerationEngine",
                  "optimizer": "Optimizer"}

# Members that are values for one kind but methods for another (a loss's ``needs_reference`` is a
# flag; an algorithm's is a method of its losses).
METHOD_MEMBERS = {"algorithm": frozenset({"needs_reference"})}
# Kinds whose optional members have defaults in a base class a plugin can subclass.
BASE_CLASS_HINTS = {"algorithm": "; subclass aligner.algorithms.Algorithm for the defaults",
                    "generation engine": "; subclass aligner.online.engines.GenerationEngine for the defaults"}


@dataclass(frozen=True)
class Entry:
    """One registered object and the plugin that registered it."""

    name: str
    obj: Any
    plugin: str


class Registry:
    """Registered classes of one kind (``"loss"``, ``"judge"``, ...), keyed by their ``name``."""

    def __init__(self, kind: str, describe: Callable[[str], str] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        # Says which plugin a name is (with its distribution) in error messages.
        self._describe = describe or (lambda plugin: f"plugin '{plugin}'")

    def add(self, obj: Any, plugin: str) -> None:
        """Check ``obj`` against its protocol and register it under ``obj.name`` for ``plugin``."""
        who = self._describe(plugin)
        what = f"'{obj.name}'" if isinstance(getattr(obj, "name", None), str) else repr(obj)
        missing = [m for m in REQUIRED_MEMBERS[self.kind] if not hasattr(obj, m)]
        if missing:
            raise PluginError(
                f"{who} registered {self.kind} {what} which lacks required member(s): " + ", ".join(missing)
                + f" (see aligner.protocols.{PROTOCOL_NAMES[self.kind]}{BASE_CLASS_HINTS.get(self.kind, '')})"
            )
        values = DATA_MEMBERS - METHOD_MEMBERS.get(self.kind, frozenset())
        not_callable = [m for m in REQUIRED_MEMBERS[self.kind] if m not in values and not callable(getattr(obj, m))]
        if not_callable:
            raise PluginError(f"{who} registered {self.kind} {what} whose member(s) {', '.join(not_callable)} "
                              "must be methods")
        name = obj.name
        if not isinstance(name, str) or not name:
            raise PluginError(f"{who} registered a {self.kind} whose name is not a non-empty string")
        if not (isinstance(obj.Options, type) and issubclass(obj.Options, BaseModel)):
            raise PluginError(f"{who} registered {self.kind} '{name}' whose Options is not a pydantic model")
        if "data_formats" in REQUIRED_MEMBERS[self.kind]:
            unknown = [f for f in obj.data_formats if f not in DATA_FORMATS]
            if unknown or not obj.data_formats:
                raise PluginError(
                    f"{who} registered {self.kind} '{name}' with invalid data_formats {obj.data_formats!r}; "
                    f"valid formats: {', '.join(DATA_FORMATS)}"
                )
        # A malformed optional ``requires`` would otherwise surface only when a stage is prepared.
        requires = getattr(obj, "requires", ())
        if not isinstance(requires, tuple | list) or not all(
                isinstance(r, Requires) and r.role in REQUIREMENT_ROLES and isinstance(r.flag, str) for r in requires):
            raise PluginError(f"{who} registered {self.kind} '{name}' whose 'requires' is not a tuple of "
                              f"aligner.protocols.Requires with a role among {', '.join(REQUIREMENT_ROLES)}")
        if self.kind == "callback" and not any(callable(getattr(obj, h, None)) for h in LIFECYCLE_HOOKS):
            raise PluginError(f"{who} registered callback '{name}' which implements none of the lifecycle hooks "
                              f"({', '.join(LIFECYCLE_HOOKS)}) as @hookimpl methods")
        if name in self._entries:
            other = self._describe(self._entries[name].plugin)
            raise PluginError(f"{self.kind} '{name}' is registered twice: by {other} and by {who}")
        self._entries[name] = Entry(name=name, obj=obj, plugin=plugin)

    def get(self, name: str, where: str = "") -> Any:
        """The class registered as ``name``; an unknown name lists the known ones."""
        if name not in self._entries:
            location = f" at {where}" if where else ""
            known = ", ".join(sorted(self._entries)) or "none"
            # Only names of about the same length are offered: plugin names are short, so 'dpp' is
            # likely a typo of 'dpo', but 'simpo' (a plugin that is not installed) is not one of 'ipo'.
            near = [n for n in self._entries if abs(len(n) - len(name)) <= max(1, len(name) // 4)]
            raise PluginError(
                f"unknown {self.kind} '{name}'{location}{suggest(name, near)}; known: {known} "
                "(is the plugin that provides it installed? `aligner plugins --all` lists what is loaded)"
            )
        return self._entries[name].obj

    def entry(self, name: str) -> Entry:
        """The full entry (with the registering plugin) for ``name``."""
        self.get(name)
        return self._entries[name]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """All entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries
