"""Few-shot critique and revision prompts, one YAML file each in ``datasets_templates/constitutional/``.

A template has ``prompt`` (the request the model completes), ``example`` (how one few-shot example is
written) and ``examples`` (the few-shot examples), with the fields ``{prompt}``, ``{answer}``,
``{critique_request}``, ``{critique}``, ``{revision_request}`` and ``{revision}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aligner.constitutional.constitution import Principle
from aligner.errors import ConfigError

FIELDS = ("prompt", "answer", "critique_request", "critique", "revision_request", "revision")


@dataclass(frozen=True)
class FewShotTemplate:
    """A request with its few-shot examples rendered in front of it."""

    name: str
    prompt: str
    example: str
    examples: tuple[dict[str, str], ...]

    def render(self, **fields: str) -> str:
        """The few-shot examples, then the request filled with ``fields``."""
        shots = "".join(self.example.format(**example) for example in self.examples)
        return shots + self.prompt.format(**fields)


def load_few_shot_template(name: str) -> FewShotTemplate:
    """A shipped template by name (``critique``, ``revision``) or a YAML path; a located ``ConfigError``."""
    from datasets_templates import TEMPLATE_DIR

    path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) \
        else TEMPLATE_DIR / "constitutional" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"few-shot template '{name}' not found (looked for {path})")
    try:
        spec: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable YAML template: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str) or not isinstance(spec.get("example"), str):
        raise ConfigError(f"{path}: a few-shot template needs the strings 'prompt' and 'example'")
    examples = spec.get("examples") or []
    if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
        raise ConfigError(f"{path}: 'examples' must be a list of mappings")
    template = FewShotTemplate(spec.get("name", path.stem), spec["prompt"], spec["example"],
                               tuple({k: str(v) for k, v in e.items()} for e in examples))
    # Rendered once here, so a misspelt field fails before a model is loaded, not mid-run.
    try:
        template.render(**dict.fromkeys(FIELDS, "x"))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{path}: the template uses an unknown field or an example lacks one: {exc} "
                          f"(fields: {', '.join(FIELDS)})") from None
    return template


def critique_prompt(template: FewShotTemplate, prompt: str, answer: str, principle: Principle) -> str:
    """The request for a critique of ``answer`` against ``principle``."""
    return template.render(prompt=prompt, answer=answer, critique_request=principle.critique, critique="",
                           revision_request=principle.revision, revision="")


def revision_prompt(template: FewShotTemplate, prompt: str, answer: str, principle: Principle,
                    critique: str) -> str:
    """The request for a revision of ``answer`` given its ``critique``."""
    return template.render(prompt=prompt, answer=answer, critique_request=principle.critique, critique=critique,
                           revision_request=principle.revision, revision="")
