"""``rule``: a judge defined by a Python function, a regular expression or keywords.

- ``callable: package.module:function``: ``function(prompt, completion) -> float``;
- ``regex: PATTERN``: 1.0 when the completion matches (``re.search``), else 0.0;
- ``keywords: [..]`` (and optional ``penalty_keywords: [..]``): the fraction of keywords present,
  minus the fraction of penalty keywords present.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from pydantic import field_validator, model_validator

from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.protocols import Options


def import_callable(path: str, what: str = "judge callable") -> Callable:
    """Import ``package.module:function`` (or ``package.module.function``); ``what`` names it in errors."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import {what} '{path}': {exc}") from None
    if not callable(function):
        raise ConfigError(f"{what} '{path}' is not callable")
    return function


class RuleJudge:
    """Scores each completion with a rule; exactly one of callable, regex, keywords is set."""

    name = "rule"

    class Options(Options):
        """Which rule."""

        callable: str | None = None
        regex: str | None = None
        keywords: list[str] | None = None
        penalty_keywords: list[str] = []

        @field_validator("regex")
        @classmethod
        def _compiles(cls, value: str | None) -> str | None:
            if value is not None:
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"not a valid regular expression: {exc}") from None
            return value

        @model_validator(mode="after")
        def _exactly_one(self):
            chosen = [k for k in ("callable", "regex", "keywords") if getattr(self, k)]
            if len(chosen) != 1:
                raise ValueError("set exactly one of 'callable', 'regex', 'keywords'")
            return self

    def __init__(self, options: Options):
        self.options = options
        self._function = import_callable(options.callable) if options.callable else None
        self._pattern = re.compile(options.regex) if options.regex else None

    def _one(self, prompt: str, completion: str) -> float:
        if self._function is not None:
            return float(self._function(prompt, completion))
        if self._pattern is not None:
            return float(bool(self._pattern.search(completion)))
        text = completion.lower()
        keywords = self.options.keywords or []
        hits = sum(k.lower() in text for k in keywords) / len(keywords)
        penalties = self.options.penalty_keywords
        return hits - (sum(k.lower() in text for k in penalties) / len(penalties) if penalties else 0.0)

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per completion."""
        return [self._one(p, c) for p, c in zip(prompts, completions, strict=True)]


@hookimpl
def register_judges(register):
    """Register the rule judge."""
    register(RuleJudge)
