"""A constitution: named principles, each a critique request and a revision request (YAML).

::

    name: kindness
    principles:
      - name: unkind
        critique: Identify specific ways in which the answer is unkind or rude.
        revision: Rewrite the answer to remove every unkind or rude word.

Every problem is reported with the file and the line of the principle at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from aligner.errors import ConfigError

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "constitution.yaml"
FIELDS = ("name", "critique", "revision")


@dataclass(frozen=True)
class Principle:
    """One principle: the request that asks for a critique and the one that asks for a revision."""

    name: str
    critique: str
    revision: str


def load_constitution(path: str | Path) -> list[Principle]:
    """The principles of the constitution at ``path``; a ``ConfigError`` naming file and line if malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"constitution not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        # The node tree keeps line numbers, so each bad principle can be pointed at.
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: could not read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list) or not data["principles"]:
        raise ConfigError(f"{path}, line 1: a constitution is a mapping with a non-empty list 'principles'")
    items = _value_node(root, "principles").value
    principles, seen = [], set()
    for number, (item, node) in enumerate(zip(data["principles"], items, strict=True), start=1):
        where = f"{path}, line {node.start_mark.line + 1}: principle {number}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with {', '.join(FIELDS)}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}' (expected {', '.join(FIELDS)})")
        for field in FIELDS:
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise ConfigError(f"{where}: '{field}' must be a non-empty string")
        if item["name"] in seen:
            raise ConfigError(f"{where}: the name '{item['name']}' is used twice")
        seen.add(item["name"])
        principles.append(Principle(item["name"], item["critique"].strip(), item["revision"].strip()))
    return principles


def _value_node(root: yaml.Node, key: str) -> yaml.Node:
    """The node under ``key`` of a mapping node (the check above made sure it is there)."""
    for key_node, value_node in root.value:
        if key_node.value == key:
            return value_node
    raise KeyError(key)
