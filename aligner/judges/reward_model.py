"""``reward_model``: a sequence-classification model (an aligner reward model or any other) as judge.

The judge renders each (prompt, completion) with a data template, exactly as training rows are
rendered (``plain`` by default), and reads the model's scalar output as the score. The model is
loaded from a local directory on first use, so a config is validated without loading weights.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from aligner.hookspecs import hookimpl
from aligner.judges import load_judge_model, saved_model_dir
from aligner.protocols import Options


class RewardModelJudge:
    """Scores completions with ``AutoModelForSequenceClassification`` loaded from ``path``."""

    name = "reward_model"

    class Options(Options):
        """Where the model is and how texts are fed to it."""

        path: str = Field(description="directory of a saved sequence-classification model and its tokenizer")
        template: str = Field("plain", description="data template used to render prompt + completion")
        label_index: int = Field(0, ge=0, description="which output logit is the score (models with several)")
        batch_size: int = Field(16, gt=0)
        max_length: int = Field(512, gt=1)
        device: str | None = None
        trust_remote_code: bool = False

        @field_validator("path")
        @classmethod
        def _is_model_dir(cls, value: str) -> str:
            return saved_model_dir(value)

    def __init__(self, options: Options):
        self.options = options
        self.model: Any = None
        self.tokenizer: Any = None
        self.template: Any = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        from aligner.data.templates import load_template

        o = self.options
        self.device, self.tokenizer, self.model = load_judge_model(
            AutoModelForSequenceClassification, o.path, o.device, o.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The classifier reads the last non-pad token, so it must know which id pads.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.template = load_template(o.template, self.tokenizer, chat_data=False)

    def encode(self, prompt: str, completion: str) -> list[int]:
        """Token ids of one rendered (prompt, completion), with BOS as training adds it, cut from the left."""
        # One text, as training tokenizes it (aligner.data.tokenize): tokenized apart, a prompt's
        # trailing space would become a token the model never saw (a lone "▁" under sentencepiece).
        text = self.template.prompt_text(prompt) + self.template.completion_text(completion)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids[-self.options.max_length:]

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The model's score for each (prompt, completion)."""
        if self.model is None:
            self._load()
        pad = self.tokenizer.pad_token_id
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(encoded), self.options.batch_size):
            chunk = encoded[start:start + self.options.batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in chunk], device=self.device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk], device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            scores.extend(logits[:, self.options.label_index].float().tolist())
        return scores


@hookimpl
def register_judges(register):
    """Register the reward-model judge."""
    register(RewardModelJudge)
