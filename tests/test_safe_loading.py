"""Loading is safe by construction: the package source never unpickles or runs remote code on its own.

The checks read the source's syntax tree (not text), so comments and docstrings do not count and
``torch.load(path, weights_only=True)`` passes while any other ``torch.load`` fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("aligner", "plugins", "datasets_templates") for p in (ROOT / d).rglob("*.py")]

UNSAFE_CALLS = {
    ("yaml", "load"): "yaml.load (use yaml.safe_load)",
    ("yaml", "unsafe_load"): "yaml.unsafe_load",
    ("yaml", "full_load"): "yaml.full_load",
    ("yaml", "load_all"): "yaml.load_all",
    ("pickle", "load"): "pickle.load",
    ("pickle", "loads"): "pickle.loads",
}
UNSAFE_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str) -> list[str]:
    """Unsafe loading patterns in one module's source, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{filename}:{node.lineno}"
            if name[-2:] == ("torch", "load") and not _is_true(keywords.get("weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
            if name[-2:] in UNSAFE_CALLS:
                found.append(f"{where}: {UNSAFE_CALLS[name[-2:]]}")
            if _is_true(keywords.get("trust_remote_code")):
                found.append(f"{where}: trust_remote_code=True hard-coded")
        if isinstance(node, ast.Attribute) and _dotted(node)[:1] == ("yaml",) and node.attr in UNSAFE_LOADERS:
            found.append(f"{filename}:{node.lineno}: yaml.{node.attr}")
    return found


def test_the_checker_catches_each_pattern():
    bad = """
import torch, yaml, pickle
torch.load("x")
torch.load("x", weights_only=False)
yaml.load(text, Loader=yaml.FullLoader)
yaml.unsafe_load(text)
pickle.loads(b"")
AutoModel.from_pretrained("m", trust_remote_code=True)
"""
    found = violations(bad, "bad.py")
    assert len(found) == 7, found
    ok = """
import torch, yaml
torch.load("x", weights_only=True)
yaml.safe_load(text)
AutoModel.from_pretrained("m", trust_remote_code=config.trust_remote_code)
"""
    assert violations(ok, "ok.py") == []


def test_package_source_has_no_unsafe_loading():
    assert len(SOURCES) > 20
    found = [v for path in SOURCES for v in violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_trust_remote_code_is_off_unless_the_user_sets_it():
    from aligner.config import ModelConfig

    assert ModelConfig(tiny={}).trust_remote_code is False
