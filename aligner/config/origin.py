"""Where config values came from (file and line, or an override), to point every error at them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigOrigin:
    """Where config values came from, to point errors at a file and line."""

    def __init__(self, path: Path | None, text: str | None):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.overridden: dict[tuple, str] = {}
        if text is not None:
            try:
                node = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.YAMLError:
                node = None
            if node is not None:
                self._index(node, ())

    def _index(self, node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, key_node.value)
                self.lines[key] = key_node.start_mark.line + 1
                self._index(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self._index(item, (*path, index))

    def where(self, loc: tuple) -> str:
        """`` (file line N)`` for the deepest known prefix of ``loc``."""
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.overridden:
                return f" (from override '{self.overridden[loc[:end]]}')"
            if loc[:end] in self.lines and self.path is not None:
                return f" ({self.path}, line {self.lines[loc[:end]]})"
        return f" ({self.path})" if self.path else ""

    def written(self, loc: tuple) -> bool | None:
        """Whether ``loc`` (or a key below it) is in the file or an override; ``None`` for a dict config,
        whose keys are not tracked."""
        if self.path is None and not self.overridden:
            return None
        if any(key[:len(loc)] == loc or loc[:len(key)] == key for key in self.overridden):
            return True
        return any(key[:len(loc)] == loc for key in self.lines)


def key_where(config: Any, loc: tuple) -> str:
    """Where the key ``loc`` of a loaded run config was set (`` (file, line N)``, `` (from override
    '...')``), or `` (not set: the default)`` when its file leaves it out, so an error never points
    at the line of an enclosing section as if the key were there."""
    source = config.origin
    if source.written(loc) is False:
        return " (not set: the default)"
    return source.where(loc)


def format_loc(loc: tuple) -> str:
    """``('stages', 0, 'train', 'lr')`` -> ``stages[0].train.lr``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
