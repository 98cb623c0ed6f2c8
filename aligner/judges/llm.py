"""``llm``: a local causal LM as judge, reading its verdict from next-token log-probabilities.

Pointwise (``score``): the judge template asks whether an answer is good; the score is
``P(yes) / (P(yes) + P(no))`` for the template's two ``choices``. Pairwise (``compare``): the template
shows answers A and B; the result is the probability that the first is better. Judges favour a
position, so with ``swap: true`` (default) every pair is also asked in the other order and the two
readings are averaged: ``p = (P(A | first, second) + P(B | second, first)) / 2``, which makes
``compare(x, y) + compare(y, x) == 1`` exactly.

A ``constitution`` (a list of principles, inline or one per line in ``constitution_file``) is put
before the question, as in Constitutional AI's AI-feedback step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from aligner.hookspecs import hookimpl
from aligner.judges import load_judge_model, saved_model_dir
from aligner.protocols import Options


def load_judge_template(name: str) -> dict[str, Any]:
    """A judge template: a shipped name in ``datasets_templates/`` or a YAML path."""
    from datasets_templates import TEMPLATE_DIR

    # Judge templates live apart from the data templates, so data.template never lists them.
    path = Path(name) if name.endswith((".yaml", ".yml")) else TEMPLATE_DIR / "judges" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"judge template '{name}' not found (looked for {path})")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "prompt" not in spec or len(spec.get("choices", [])) != 2:
        raise ValueError(f"judge template {path} needs a 'prompt' and exactly two 'choices'")
    return spec


def render_constitution(spec: dict[str, Any], principles: list[str]) -> str:
    """The constitution block of a judge prompt ('' without principles)."""
    if not principles:
        return ""
    lines = "".join(spec.get("principle", "- {principle}\n").format(principle=p) for p in principles)
    return spec.get("constitution_header", "") + lines + "\n"


class LLMJudge:
    """A causal LM prompted with judge templates; pointwise ``score`` and pairwise ``compare``."""

    name = "llm"

    class Options(Options):
        """The judge model, its templates and an optional constitution."""

        path: str = Field(description="directory of a saved causal LM and its tokenizer")
        pointwise_template: str = "judge_pointwise"
        pairwise_template: str = "judge_pairwise"
        constitution: list[str] = Field(default_factory=list, description="principles put before the question")
        constitution_file: str | None = Field(None, description="a text file with one principle per line")
        swap: bool = Field(True, description="pairwise: ask in both orders and average (position-bias fix)")
        batch_size: int = Field(8, gt=0)
        max_length: int = Field(1024, gt=1, description="judge prompts are cut from the left to this")
        device: str | None = None
        trust_remote_code: bool = False

        @field_validator("path")
        @classmethod
        def _is_model_dir(cls, value: str) -> str:
            return saved_model_dir(value)

        @field_validator("pointwise_template", "pairwise_template")
        @classmethod
        def _template_exists(cls, value: str) -> str:
            load_judge_template(value)
            return value

        @model_validator(mode="after")
        def _read_constitution(self):
            if self.constitution_file is not None:
                path = Path(self.constitution_file).expanduser()
                if not path.is_file():
                    raise ValueError(f"constitution_file not found: {path}")
                self.constitution = [*self.constitution,
                                     *(line.strip() for line in path.read_text().splitlines() if line.strip())]
            return self

    def __init__(self, options: Options):
        self.options = options
        self.pointwise = load_judge_template(options.pointwise_template)
        self.pairwise = load_judge_template(options.pairwise_template)
        self.model: Any = None
        self.tokenizer: Any = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        o = self.options
        self.device, self.tokenizer, self.model = load_judge_model(
            AutoModelForCausalLM, o.path, o.device, o.trust_remote_code)

    def choice_ids(self, spec: dict[str, Any]) -> list[list[int]]:
        """The token ids of the template's two choices (several tokens each, if the tokenizer splits them)."""
        if self.model is None:
            self._load()
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in spec["choices"]]
        if ids[0] == ids[1] or not all(ids):
            raise ValueError(f"the judge's choices {spec['choices']} must tokenize to different, non-empty ids")
        return ids

    def render(self, spec: dict[str, Any], **fields: str) -> str:
        """One judge prompt, constitution included."""
        return spec["prompt"].format(constitution=render_constitution(spec, self.options.constitution), **fields)

    @torch.no_grad()
    def _continuation_logps(self, prompts: list[list[int]], continuation: list[int]) -> list[float]:
        """log P(continuation | prompt) for each prompt (left-padded batches)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        n = len(continuation)
        results: list[float] = []
        for start in range(0, len(prompts), self.options.batch_size):
            chunk = [p + continuation for p in prompts[start:start + self.options.batch_size]]
            width = max(len(x) for x in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            # Left padding puts every continuation in the last n columns.
            logps = logits[:, -n - 1:-1].float().log_softmax(-1)
            targets = ids[:, -n:].unsqueeze(-1)
            results.extend(logps.gather(-1, targets).squeeze(-1).sum(-1).tolist())
        return results

    def first_choice_probability(self, spec: dict[str, Any], texts: list[str]) -> list[float]:
        """For each rendered prompt, P(first choice) among the template's two choices.

        With single-token choices this is the softmax of the two next-token logits; longer choices
        compare the log-probabilities of their whole token sequences.
        """
        first, second = self.choice_ids(spec)
        limit = self.options.max_length - max(len(first), len(second))
        prompts = [self.tokenizer(t)["input_ids"][-limit:] for t in texts]
        pairs = torch.tensor([self._continuation_logps(prompts, first), self._continuation_logps(prompts, second)])
        return torch.softmax(pairs, dim=0)[0].tolist()

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Pointwise: P(the answer is good) for each (prompt, completion)."""
        texts = [self.render(self.pointwise, question=p, answer=c) for p, c in zip(prompts, completions, strict=True)]
        return self.first_choice_probability(self.pointwise, texts)

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """Pairwise: P(``first[i]`` is better than ``second[i]``), position-debiased when ``swap``."""
        rows = list(zip(prompts, first, second, strict=True))
        forward = self.first_choice_probability(
            self.pairwise, [self.render(self.pairwise, question=p, first=a, second=b) for p, a, b in rows])
        if not self.options.swap:
            return forward
        backward = self.first_choice_probability(
            self.pairwise, [self.render(self.pairwise, question=p, first=b, second=a) for p, a, b in rows])
        return [(f + (1.0 - b)) / 2 for f, b in zip(forward, backward, strict=True)]


@hookimpl
def register_judges(register):
    """Register the LLM judge."""
    register(LLMJudge)
