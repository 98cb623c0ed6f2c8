"""``http``: a judge backed by an OpenAI-compatible chat-completions server (vLLM, llama.cpp, OpenAI, ...).

Pointwise, ``score`` asks the server to rate each (prompt, completion) on ``[min_score, max_score]``
and returns the ratings, rescaled to ``[0, 1]`` unless ``normalize`` is off. Pairwise, ``compare``
asks which of two completions is better, in both orders when ``swap`` is on (to cancel the judge's
position bias), and returns the probability that the first one wins: 1, 0.5 or 0.

Requests run on ``max_concurrency`` threads; each is retried as ``ChatClient`` describes. If one item
still fails, the error names its index (``prompt 3``) and the reason, and the rest are cancelled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from aligner.errors import ConfigError
from aligner.protocols import Options
from aligner_http_judge.client import ChatClient
from aligner_http_judge.parsing import parse_choice, parse_score

T = TypeVar("T")

SYSTEM_PROMPT = "You are a careful, impartial judge of answers written by an AI assistant."
SCORE_TEMPLATE = (
    "Rate how well the response answers the prompt: helpful, correct, polite and on topic. "
    "Use a scale from {min_score} (worst) to {max_score} (best). "
    "Reply with one line, 'Score: N', and nothing else.\n\n"
    "[Prompt]\n{prompt}\n\n[Response]\n{completion}"
)
COMPARE_TEMPLATE = (
    "Which response answers the prompt better: more helpful, correct, polite and on topic? "
    "Reply with one letter, 'A' or 'B', and nothing else.\n\n"
    "[Prompt]\n{prompt}\n\n[Response A]\n{completion_a}\n\n[Response B]\n{completion_b}"
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Upper-case names are printed in messages; anything else might be a key pasted by mistake.
_CONVENTIONAL_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
_PLACEHOLDER = re.compile(r"\{(prompt|completion|completion_a|completion_b|min_score|max_score)\}")


def fill(template: str, **values: Any) -> str:
    """Substitute ``{name}`` placeholders in one pass (braces elsewhere, and in the values, stay as they are)."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


class HTTPJudge:
    """Scores or compares completions by asking a chat-completions server."""

    name = "http"

    class Options(Options):
        """Server, model, prompts and the request policy. The API key itself is never an option."""

        base_url: str = Field(description="server base URL; requests go to {base_url}/chat/completions")
        model: str = Field(description="model name sent in each request")
        api_key_env: str | None = Field(
            "OPENAI_API_KEY", description="NAME of the environment variable holding the API key; null: no key")
        timeout: float = Field(30.0, gt=0, description="seconds per socket operation of one request")
        max_retries: int = Field(3, ge=0, description="retries of a failed request before giving up")
        backoff: float = Field(1.0, ge=0, description="seconds before the first retry; doubles each time")
        backoff_max: float = Field(30.0, ge=0, description="longest pause between retries")
        max_concurrency: int = Field(4, gt=0, description="requests in flight at once")
        temperature: float = Field(0.0, ge=0)
        max_tokens: int = Field(32, gt=0, description="tokens the judge may write")
        system_prompt: str = SYSTEM_PROMPT
        template: str = Field(SCORE_TEMPLATE, description="pointwise prompt; {prompt} and {completion} required")
        compare_template: str = Field(COMPARE_TEMPLATE, description="pairwise prompt; {prompt}, "
                                      "{completion_a} and {completion_b} required")
        min_score: float = 1.0
        max_score: float = 10.0
        normalize: bool = Field(True, description="rescale scores from [min_score, max_score] to [0, 1]")
        swap: bool = Field(True, description="pairwise: ask in both orders to cancel position bias")

        @field_validator("base_url")
        @classmethod
        def _http_only(cls, value: str) -> str:
            parsed = urlparse(value)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError("must be an http:// or https:// URL")
            return value

        @model_validator(mode="after")
        def _templates_and_range(self):
            for key, needed in (("template", ("{prompt}", "{completion}")),
                                ("compare_template", ("{prompt}", "{completion_a}", "{completion_b}"))):
                missing = [n for n in needed if n not in getattr(self, key)]
                if missing:
                    raise ValueError(f"'{key}' lacks the placeholder(s) {', '.join(missing)}")
            if self.min_score >= self.max_score:
                raise ValueError("min_score must be below max_score")
            return self

    def __init__(self, options: Options):
        self.options = options
        name = options.api_key_env
        # The value is never echoed: a user who pasted the key itself here must not see it in a log.
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ConfigError("http judge: api_key_env must be the NAME of an environment variable (letters, "
                              "digits and underscores), not the key itself; the value given is not shown")
        if name and not os.environ.get(name):
            shown = name if _CONVENTIONAL_NAME.fullmatch(name) else "named by api_key_env"
            raise ConfigError(
                f"http judge: the environment variable {shown} (api_key_env) is not set; "
                "set it to the API key, or set api_key_env: null for a server without authentication")
        self.client = ChatClient(options.base_url, options.api_key_env, options.timeout, options.max_retries,
                                 options.backoff, options.backoff_max)

    def __repr__(self) -> str:
        o = self.options
        return f"HTTPJudge(base_url={o.base_url!r}, model={o.model!r}, api_key_env={o.api_key_env!r})"

    def _body(self, content: str) -> dict[str, Any]:
        o = self.options
        return {"model": o.model, "temperature": o.temperature, "max_tokens": o.max_tokens,
                "messages": [{"role": "system", "content": o.system_prompt}, {"role": "user", "content": content}]}

    def _map(self, function: Callable[[int], T], count: int) -> list[T]:
        """``[function(0), ..., function(count - 1)]`` on a bounded thread pool; the first failure (by index) wins."""
        if count == 0:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, count),
                                  thread_name_prefix="http-judge")
        try:
            futures = [pool.submit(function, i) for i in range(count)]
            return [future.result() for future in futures]
        finally:
            # On an error, queued requests are dropped rather than sent for a result nobody reads.
            pool.shutdown(wait=True, cancel_futures=True)

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion) pair; higher is better."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        o = self.options

        def one(i: int) -> float:
            content = fill(o.template, prompt=prompts[i], completion=completions[i],
                           min_score=f"{o.min_score:g}", max_score=f"{o.max_score:g}")
            value = self.client.ask(self._body(content), lambda text: parse_score(text, o.min_score, o.max_score),
                                    f"prompt {i}")
            return (value - o.min_score) / (o.max_score - o.min_score) if o.normalize else value

        return self._map(one, len(prompts))

    def compare(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> list[float]:
        """Per prompt, the probability that ``completions_a[i]`` is better than ``completions_b[i]``."""
        if not len(prompts) == len(completions_a) == len(completions_b):
            raise ValueError("prompts, completions_a and completions_b differ in length")
        orders = 2 if self.options.swap else 1

        def one(job: int) -> float:
            i, swapped = divmod(job, orders)
            first, second = (completions_b[i], completions_a[i]) if swapped else (completions_a[i], completions_b[i])
            content = fill(self.options.compare_template, prompt=prompts[i], completion_a=first, completion_b=second)
            winner = self.client.ask(self._body(content), parse_choice, f"prompt {i}")
            return 1.0 if (winner == "A") != bool(swapped) else 0.0

        votes = self._map(one, len(prompts) * orders)
        return [sum(votes[i * orders:(i + 1) * orders]) / orders for i in range(len(prompts))]
