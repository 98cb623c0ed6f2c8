"""Name -> class registries that check what plugins register and remember who registered it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from aligner.errors import PluginError, suggest
from aligner.kinds import Kind, get_kind


@dataclass(frozen=True)
class Entry:
    """One registered object and the plugin that registered it."""

    name: str
    obj: Any
    plugin: str


class Registry:
    """Registered classes of one kind (``"loss"``, ``"judge"``, ...), keyed by their ``name``.

    What it checks is read from the kind's row of ``aligner.kinds.KINDS``."""

    def __init__(self, kind: str | Kind, describe: Callable[[str], str] | None = None):
        self.spec = kind if isinstance(kind, Kind) else get_kind(kind)
        self.kind = self.spec.name
        self._entries: dict[str, Entry] = {}
        # Says which plugin a name is (with its distribution) in error messages.
        self._describe = describe or (lambda plugin: f"plugin '{plugin}'")

    def add(self, obj: Any, plugin: str) -> None:
        """Check ``obj`` against its protocol, give it the optional members it lacks (their declared
        defaults), and register it under ``obj.name`` for ``plugin``."""
        spec, who = self.spec, self._describe(plugin)
        what = f"'{obj.name}'" if isinstance(getattr(obj, "name", None), str) else repr(obj)
        missing = [m for m in spec.required if not hasattr(obj, m)]
        if missing:
            hint = f"; subclass {spec.base} for the defaults" if spec.base else ""
            raise PluginError(f"{who} registered {self.kind} {what} which lacks required member(s): "
                              f"{', '.join(missing)} (see {spec.protocol_path}{hint})")
        not_callable = spec.not_methods(obj)
        if not_callable:
            raise PluginError(f"{who} registered {self.kind} {what} whose member(s) {', '.join(not_callable)} "
                              "must be methods")
        name = obj.name
        if not isinstance(name, str) or not name:
            raise PluginError(f"{who} registered a {self.kind} whose name is not a non-empty string")
        if not (isinstance(obj.Options, type) and issubclass(obj.Options, BaseModel)):
            raise PluginError(f"{who} registered {self.kind} '{name}' whose Options is not a pydantic model")
        spec.fill_defaults(obj)
        for check in spec.checks:
            problem = check(obj)
            if problem:
                raise PluginError(f"{who} registered {self.kind} '{name}' {problem}")
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
