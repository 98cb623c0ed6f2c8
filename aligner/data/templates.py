"""Turning prompts and completions (plain strings or chat messages) into text.

A template is a YAML file in ``datasets_templates/`` (or any path) with these keys:

- ``message``: how a message is written, with ``{role}`` and ``{content}``; ``system``, ``user``,
  ``assistant`` and ``tool`` override it per role;
- ``generation_prompt``: written after the prompt so the model answers as the assistant;
- ``completion_end``: written after the completion and trained on (``{eos}`` is the tokenizer's
  end-of-sequence token);
- ``text_prompt``: how a prompt given as a plain string is written, with ``{content}`` (optional;
  without it a string prompt is one user message followed by ``generation_prompt``);
- ``default_system``: a system message added to chat prompts that have none (optional);
- ``name``, ``description``: for people.

A completion of several messages (an assistant turn, a user turn, another assistant turn, ...) is
written with the same markup as a prompt: the first assistant message continues the turn that
``generation_prompt`` opened, every later message is written in full, and the last assistant message
ends with ``completion_end``. The text is what the model reads; where its tokens divide into prompt
and completion is decided by ``aligner.data.tokenize`` on the tokens of the whole text.

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


TEMPLATE_KEYS = ("name", "description", "message", "system", "user", "assistant", "tool", "generation_prompt",
                 "completion_end", "text_prompt", "default_system")


@dataclass
class Template:
    """Render a prompt and its completion to text with a template definition."""

    name: str
    spec: dict[str, Any]
    eos: str

    def _format(self, key: str, default: str = "", **fields: str) -> str:
        return self.spec.get(key, default).format(eos=self.eos, **fields)

    def _message(self, message: dict[str, str]) -> str:
        pattern = self.spec.get(message["role"], self.spec.get("message", "{content}\n"))
        return pattern.format(role=message["role"], content=message["content"], eos=self.eos)

    def prompt_text(self, prompt: str | list[dict[str, str]]) -> str:
        """The text fed to the model before the completion."""
        if isinstance(prompt, str) and "text_prompt" in self.spec:
            return self._format("text_prompt", content=prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.spec.get("default_system") and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.spec["default_system"]})
        body = "".join(self._message(m) for m in messages)
        return body + self._format("generation_prompt")

    def completion_text(self, completion: str | list[dict[str, str]]) -> str:
        """The text the model is trained to produce, including the end marker.

        The prompt ended with ``generation_prompt``, which opened the first assistant turn; a
        completion of several messages writes every later one with its full markup, so a multi-turn
        completion reads exactly as the same conversation would in a prompt.
        """
        end = self._format("completion_end", "{eos}")
        if isinstance(completion, str):
            return completion + end
        opener = self._format("generation_prompt")
        parts = []
        for i, message in enumerate(completion):
            last = i == len(completion) - 1
            if message["role"] != "assistant":
                parts.append(self._message(message))
                continue
            # The first assistant turn was opened by the prompt; a later one opens itself.
            start = "" if i == 0 else opener
            if last:
                parts.append(start + message["content"] + end)
                continue
            full = self._message(message)
            if opener and full.startswith(opener):
                parts.append(full[len(opener):] if i == 0 else full)
            else:  # no generation prompt, or a pattern unlike it: write the turn as a trained turn ends
                parts.append(start + message["content"] + end)
        return "".join(parts)


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
    unknown = sorted(set(spec) - set(TEMPLATE_KEYS))
    if unknown:
        # A misspelt key would otherwise be ignored and the default used without a word.
        raise ConfigError(f"template file {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(TEMPLATE_KEYS)}")
    return Template(name=spec.get("name", path.stem), spec=spec, eos=tokenizer.eos_token or "")
