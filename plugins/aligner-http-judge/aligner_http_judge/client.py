"""A minimal client for OpenAI-compatible ``/chat/completions`` endpoints, on the standard library.

One request per call, with a timeout; transient failures (timeouts, refused or dropped connections,
HTTP 408/429/5xx, a body that is not the expected JSON, a reply the caller cannot read) are retried
with exponential backoff and jitter; anything else fails at once. The API key is read from the
environment at each request and never stored on the object, logged, or put in an error message.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from aligner.errors import PluginError

log = logging.getLogger("aligner")

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class JudgeRequestError(PluginError):
    """The server could not give a usable answer for one prompt, even after retries."""


class Retry(Exception):
    """A transient failure: worth asking again after a pause (``delay`` overrides the backoff)."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.delay = delay


class Fatal(Exception):
    """A failure that asking again will not fix (bad request, authentication, not found)."""


class ChatClient:
    """Posts chat requests to ``{base_url}/chat/completions`` and returns the reply text."""

    def __init__(self, base_url: str, api_key_env: str | None, timeout: float, max_retries: int,
                 backoff: float, backoff_max: float, sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.sleep = sleep

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, api_key_env={self.api_key_env!r})"

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def redact(self, text: str) -> str:
        """``text`` with the API key (should a server echo it back) replaced by ``***``."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based): doubling, capped, +-20 % jitter."""
        return min(self.backoff_max, self.backoff * 2 ** (retry - 1)) * random.uniform(0.8, 1.2)

    def _post_once(self, body: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").strip()
            message = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
            if exc.code in RETRYABLE_STATUS:
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                delay = float(retry_after) if retry_after and retry_after.isdigit() else None
                raise Retry(message, delay) from None
            if exc.code in (401, 403):
                message += f" (check the API key in the environment variable {self.api_key_env})"
            raise Fatal(message) from None
        except TimeoutError:
            raise Retry(f"timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise Retry(f"timed out after {self.timeout:g} s") from None
            raise Retry(f"cannot connect: {reason}") from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise Retry(f"connection failed: {type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = raw[:120].decode("utf-8", "replace")
            raise Retry(f"malformed response (not chat-completions JSON): {snippet!r}") from None
        if not isinstance(content, str):
            raise Retry(f"malformed response: message content is {type(content).__name__}, not text")
        return content

    def ask(self, body: dict[str, Any], read: Callable[[str], tuple[T | None, str]], what: str) -> T:
        """Post ``body`` until ``read(reply)`` returns a value; retries transient failures.

        ``read`` returns ``(value, "")`` or ``(None, reason)``; an unreadable reply is retried too
        (a sampled judge may answer properly the next time). ``what`` names the item in messages,
        e.g. ``"prompt 3"``. Raises ``JudgeRequestError`` when retries are exhausted.
        """
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                value, reason = read(self._post_once(body))
                if value is not None:
                    return value
                raise Retry(reason)
            except Fatal as exc:
                raise JudgeRequestError(self.redact(f"http judge: {what}: {exc} ({self.url})")) from None
            except Retry as exc:
                if attempt == attempts:
                    raise JudgeRequestError(self.redact(
                        f"http judge: {what}: {exc} ({self.url}; gave up after {attempts} attempts)")) from None
                wait = min(exc.delay, self.backoff_max) if exc.delay is not None else self.delay(attempt)
                log.warning("%s", self.redact(f"http judge: {what}: {exc}; retrying in {wait:.2g} s "
                                              f"(attempt {attempt + 1} of {attempts})"))
                self.sleep(wait)
        raise AssertionError("unreachable")
