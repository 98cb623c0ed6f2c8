"""Turning prompts and completions (plain strings or chat messages) into text.

A template is a YAML file in ``datasets_templates/`` (or any path) with these keys:

- ``message``: how a message is written, with ``{role}`` and ``{content}``; ``system``, ``user`` and
  ``assistant`` override it per role;
- ``generation_prompt``: written after the prompt so the model answers as the assistant;
- ``completion_end``: written after the completion and trained on (``{eos}`` is the tokenizer's
  end-of-sequence token);
- ``default_system``: a system message added when the prompt has none (optional).

The special name ``tokenizer`` uses the tokenizer's own chat template; ``auto`` picks that when the
tokenizer has one and ``plain`` otherwise (an error for chat data, which needs markup).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aligner.errors import ConfigError, DataError
from datasets_templates import TEMPLATE_DIR


def available_templates() -> list[str]:
    """Names of the templates shipped in ``datasets_templates/``, plus ``tokenizer``."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml")) + ["tokenizer"]


@dataclass
class Template:
    """Render a prompt and its completion to text with a template definition."""

    name: str
    spec: dict[str, Any]
    eos: str

    def _message(self, message: dict[str, str]) -> str:
        pattern = self.spec.get(message["role"], self.spec.get("message", "{content}\n"))
        return pattern.format(role=message["role"], content=message["content"], eos=self.eos)

    def prompt_text(self, prompt: str | list[dict[str, str]]) -> str:
        """The text fed to the model before the completion."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.spec.get("default_system") and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.spec["default_system"]})
        body = "".join(self._message(m) for m in messages)
        return body + self.spec.get("generation_prompt", "").format(eos=self.eos)

    def completion_text(self, completion: str | list[dict[str, str]]) -> str:
        """The text the model is trained to produce, including the end marker."""
        if isinstance(completion, list):
            completion = "".join(m["content"] for m in completion)
        return completion + self.spec.get("completion_end", "{eos}").format(eos=self.eos)


class TokenizerTemplate:
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @staticmethod
    def _messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def prompt_text(self, prompt: str | list[dict[str, str]]) -> str:
        """The prompt with the tokenizer's generation prompt appended."""
        return self.tokenizer.apply_chat_template(self._messages(prompt), tokenize=False, add_generation_prompt=True)

    def completion_text(self, completion: str | list[dict[str, str]]) -> str:
        """The part of the full conversation after the prompt: the assistant turn and its end marker."""
        messages = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        # Render a one-turn conversation and take what follows its prompt, as TRL does: the
        # template decides the assistant's end marker.
        probe = [{"role": "user", "content": "x"}]
        prefix = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(probe + list(messages), tokenize=False)
        return full[len(prefix):]


def load_template(name: str, tokenizer: Any, chat_data: bool) -> Template | TokenizerTemplate:
    """Resolve a template name (``auto``, ``tokenizer``, a shipped name, or a YAML path)."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        if has_own:
            return TokenizerTemplate(tokenizer)
        if chat_data:
            raise DataError(
                "the data is in chat format but the tokenizer has no chat template; set data.template to one "
                f"of: {', '.join(t for t in available_templates() if t != 'tokenizer')} (or a YAML file path)"
            )
        name = "plain"
    if name == "tokenizer":
        if not has_own:
            raise ConfigError(f"data.template is 'tokenizer' but the tokenizer has no chat template; "
                              f"available templates: {', '.join(available_templates()[:-1])}")
        return TokenizerTemplate(tokenizer)
    path = Path(name) if name.endswith((".yaml", ".yml")) else TEMPLATE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown template '{name}' (data.template); available: {', '.join(available_templates())}")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ConfigError(f"template file {path} must be a YAML mapping")
    return Template(name=spec.get("name", path.stem), spec=spec, eos=tokenizer.eos_token or "")
