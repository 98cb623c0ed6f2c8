"""The ``openai_server`` generation engine: rollouts from an OpenAI-compatible completions server
(``vllm serve``, SGLang), with the policy's weights pushed to it after each update where it can take them.

Each prompt is one ``POST {base_url}/completions`` request asking for its ``samples_per_prompt``
samples with ``n`` (or, with ``use_n: false``, one request per sample), at most ``max_concurrency``
requests in flight; prompts go as token ids and the completions' token ids and log-probs come back
(vLLM's ``return_token_ids`` / ``return_tokens_as_token_ids``), so nothing is re-tokenized.

``weight_sync`` says how the server follows the policy, checked whenever ``policy_version`` changed
since the last sync (and before the first rollout):

- ``none``: the server keeps its weights; rollouts are off-policy after the first update (warned once);
- ``lora``: the policy's LoRA adapter is saved where the server can read it and loaded with vLLM's
  ``/v1/load_lora_adapter`` under a new name (the previous one is unloaded); requests then name it;
- ``disk``: the full weights (adapters merged) are saved in Hugging Face format and the server is told
  to reload them (``update_endpoint``, SGLang's ``/update_weights_from_disk`` by default).

Only the standard library is used (``urllib``). The API key is read from the environment variable
that ``api_key_env`` names and never appears in a message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from aligner.errors import AlignerError, ConfigError, os_error
from aligner.hookspecs import hookimpl
from aligner.online.engines import GenerationEngine, GenerationRequest, Generations
from aligner.online.engines.weights import is_quantized, lora_problem, save_adapter, save_full
from aligner.online.sampler import cut_after_eos
from aligner.protocols import Options

log = logging.getLogger("aligner")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ServerAnswerError(ValueError):
    """A server's answer that is not what the completions API promises (turned into an ``AlignerError``)."""


def parse_choice(choice: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The token ids and log-probs of one completions ``choice``.

    The ids come from ``token_ids`` (vLLM's ``return_token_ids``) or else from the log-prob ``tokens``,
    which vLLM writes as ``"token_id:123"`` with ``return_tokens_as_token_ids``; text tokens cannot be
    mapped back to ids reliably and are refused.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
        raise ServerAnswerError("a choice has no 'logprobs.token_logprobs' (the server ignored 'logprobs')")
    values = logprobs["token_logprobs"]
    ids = choice.get("token_ids")
    if ids is None:
        tokens = logprobs.get("tokens")
        if not isinstance(tokens, list):
            raise ServerAnswerError("a choice has neither 'token_ids' nor 'logprobs.tokens'")
        ids = [_token_id(token) for token in tokens]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ServerAnswerError("a choice's 'token_ids' is not a list of integers")
    if len(ids) != len(values):
        raise ServerAnswerError(f"a choice has {len(ids)} tokens but {len(values)} log-probs")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ServerAnswerError("a choice's 'token_logprobs' holds a value that is not a number")
    return ids, [float(v) for v in values]


def _token_id(token: Any) -> int:
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].lstrip("-").isdigit():
        return int(token[9:])
    raise ServerAnswerError(
        f"the server returned token text ({str(token)[:40]!r}), not token ids: aligner needs ids, e.g. vLLM "
        "with 'return_tokens_as_token_ids' (sent by default; keep the server's OpenAI API at vLLM 0.6 or later)")


class OpenAIServerEngine(GenerationEngine):
    """Rollouts from an OpenAI-compatible completions server, one request per prompt."""

    name = "openai_server"

    class Options(Options):
        """Where the server is, how to ask it, and how it follows the policy's updates."""

        base_url: str = Field(..., description="the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
        model: str | None = Field(None, description="the served model's name (default: the first of GET /models)")
        api_key_env: str | None = Field(None, description=(
            "name of the environment variable holding the API key (never the key itself)"))
        timeout: float = Field(300.0, gt=0, description="seconds one request may take")
        max_concurrency: int = Field(16, gt=0, description="requests in flight at once (one prompt each)")
        use_n: bool = Field(True, description=(
            "ask for a prompt's samples with 'n' in one request (false: one request per sample)"))
        weight_sync: Literal["none", "lora", "disk"] = Field("none", description=(
            "none: the server keeps its weights (off-policy after the first update); lora: load the "
            "policy's LoRA adapter after each update (vLLM); disk: save full weights and have the server "
            "reload them (update_endpoint)"))
        weights_dir: str | None = Field(None, description=(
            "a directory the server can read where lora/disk sync writes (default: a temporary directory)"))
        lora_name: str = Field("aligner-policy", description="prefix of the adapter names loaded into the server")
        update_endpoint: str = Field("/update_weights_from_disk", description=(
            "disk sync POSTs {model_path: ...} to this path of the server's root (SGLang's endpoint)"))
        extra_body: dict[str, Any] = Field(default_factory=dict, description=(
            "more fields for every completions request; they override aligner's, and null removes one"))

        @field_validator("base_url")
        @classmethod
        def _is_http(cls, value: str) -> str:
            if not re.match(r"https?://[^/]+", value):
                raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
            return value.rstrip("/")

        @field_validator("api_key_env")
        @classmethod
        def _is_a_name(cls, value: str | None) -> str | None:
            # The message never repeats the value: it may be a pasted key.
            if value is not None and not _ENV_NAME.fullmatch(value):
                raise ValueError("must be the name of an environment variable (e.g. OPENAI_API_KEY), not the key")
            return value

        @field_validator("update_endpoint")
        @classmethod
        def _is_a_path(cls, value: str) -> str:
            if not value.startswith("/"):
                raise ValueError("must be a path starting with '/', e.g. /update_weights_from_disk")
            return value

    def __init__(self, options: Options):
        # Built once more while options are validated: nothing here may connect or create files.
        super().__init__(options)
        self._pool: ThreadPoolExecutor | None = None
        self._model: str | None = options.model
        self._synced: int | None = None
        self._first_version: int | None = None
        self._warned_off_policy = False
        self._weights_dir: Path | None = None
        self._temporary_dir = False
        self._written: Path | None = None
        self._adapter: str | None = None  # the adapter requests name (every process)
        self._loaded: str | None = None  # the adapter this process loaded into the server
        self._run_tag = uuid.uuid4().hex[:8]  # adapter names stay unique across runs on one server

    # -- configuration ----------------------------------------------------------------------------

    @property
    def root(self) -> str:
        """The server's root URL: ``base_url`` without its trailing ``/v1``."""
        return self.options.base_url.removesuffix("/v1")

    def check_stage(self, stage: Any) -> None:
        """Refuse ``weight_sync: lora`` on a stage that trains no LoRA adapter, ``disk`` on a 4-bit base,
        and an ``api_key_env`` that is not set."""
        where = f"'stages[{stage.index}].algorithm.engine"
        peft = getattr(stage, "peft", None)
        peft_name = getattr(peft, "name", None) or stage.config.peft.name
        sync = self.options.weight_sync
        if sync == "lora":
            dora = getattr(getattr(peft, "options", None), "dora", None)
            if peft_name == "full":
                raise ConfigError(f"stage '{stage.name}': {where}.weight_sync' is 'lora', which pushes the policy's "
                                  f"LoRA adapter to the server, but 'stages[{stage.index}].peft' trains the full "
                                  f"model: set peft to {{name: lora}}, or use weight_sync: disk")
            if peft_name == "dora" or dora:
                raise ConfigError(f"stage '{stage.name}': {where}.weight_sync' is 'lora', but the stage trains a "
                                  f"DoRA adapter, which vLLM's LoRA serving does not apply: use weight_sync: disk")
        if sync == "disk" and peft_name == "qlora":
            raise ConfigError(f"stage '{stage.name}': {where}.weight_sync' is 'disk', but a qlora base is 4-bit and "
                              f"cannot be saved as plain weights: use weight_sync: lora")
        name = self.options.api_key_env
        if name is not None and not os.environ.get(name):
            raise ConfigError(f"stage '{stage.name}': {where}.api_key_env' names the environment variable "
                              f"'{name}', which is not set")

    # -- generation -------------------------------------------------------------------------------

    def generate(self, policy: torch.nn.Module, tokenizer: Any, request: GenerationRequest) -> Generations:
        """Sync the server's weights if the policy changed, then one request per prompt (or per sample)."""
        self._sync(policy, request.policy_version)
        model = self._served_model()
        eos = tokenizer.eos_token_id
        group = request.samples_per_prompt
        per_request = group if self.options.use_n else 1
        jobs = []
        for i, prompt in enumerate(request.prompt_ids):
            for j in range(group // per_request):
                seed = None if request.seed is None else request.seed + i * group + j
                jobs.append(self._body(model, prompt, per_request, request, eos, seed))
        answers = list(self._executor().map(self._complete, jobs))
        result = Generations([], [])
        for body, choices in zip(jobs, answers, strict=True):
            if len(choices) != body["n"]:
                raise self._error(f"{self.options.base_url}/completions",
                                  f"asked for {body['n']} completions of a prompt, got {len(choices)}")
            for ids, logps in choices:
                ids, logps = cut_after_eos(ids, logps, eos)
                result.completion_ids.append(ids)
                result.logprobs.append(logps)
        return result

    def _body(self, model: str, prompt: list[int], n: int, request: GenerationRequest, eos: int | None,
              seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model, "prompt": list(prompt), "n": n, "max_tokens": request.max_new_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "logprobs": 1, "echo": False,
            "stream": False,
            # vLLM's extensions: token ids back instead of text, and sampling exactly as asked: a served
            # model's generation_config would otherwise add its own top_k / min_p / repetition penalty.
            "return_tokens_as_token_ids": True, "return_token_ids": True, "skip_special_tokens": False,
            "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
        }
        if eos is not None:
            body["stop_token_ids"] = [eos]  # the trainer's EOS ends a completion even if the server's differs
        if seed is not None:
            body["seed"] = seed
        body.update(self.options.extra_body)
        # null removes a field: a server that rejects vLLM's extensions can be sent without them.
        return {k: v for k, v in body.items() if v is not None}

    def _complete(self, body: dict[str, Any]) -> list[tuple[list[int], list[float]]]:
        url = f"{self.options.base_url}/completions"
        answer = self._post_json(url, body)
        try:
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
                raise ServerAnswerError("the answer has no 'choices' list")
            ordered = sorted(choices, key=lambda c: c.get("index", 0))  # vLLM numbers a prompt's n samples
            return [parse_choice(c) for c in ordered]
        except ServerAnswerError as exc:
            raise self._error(url, f"malformed answer: {exc}") from None

    def _served_model(self) -> str:
        if self._adapter is not None:
            return self._adapter
        if self._model is None:
            url = f"{self.options.base_url}/models"
            answer = self._request(url, None)
            try:
                self._model = json.loads(answer)["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise self._error(url, "malformed answer: expected {data: [{id: ...}]}; set the engine's "
                                       "'model' option") from None
        return self._model

    # -- weight sync ------------------------------------------------------------------------------

    def _sync(self, policy: torch.nn.Module, version: int) -> None:
        if self.options.weight_sync == "none":
            if self._first_version is None:
                self._first_version = version
            elif version != self._first_version and not self._warned_off_policy:
                self._warned_off_policy = True
                log.warning("generation engine 'openai_server': weight_sync is 'none', so the server at %s keeps "
                            "its weights and rollouts are off-policy from now on (the policy has been updated); "
                            "use weight_sync: lora or disk to push updates", self.options.base_url)
            return
        if version == self._synced:
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and self._synced is None:
            # Every process must name process 0's adapters: its tag is the run's.
            tag = [self._run_tag]
            torch.distributed.broadcast_object_list(tag, src=0)
            self._run_tag = tag[0]
        if any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in policy.parameters()):
            # Sharded weights (FSDP, ZeRO-3): process 0 alone holds only its shard of them.
            raise self._error(self.root, f"weight_sync '{self.options.weight_sync}' cannot push sharded weights "
                                         "(FSDP/DeepSpeed ZeRO-3); train under DDP or use weight_sync: none")
        # Every process holds the same weights: one of them writes and pushes them, the others wait for its
        # outcome, so that a failed push stops every process with the same message instead of a hang.
        failure = None
        if not distributed or torch.distributed.get_rank() == 0:
            try:
                if self.options.weight_sync == "lora":
                    self._push_adapter(policy, version)
                else:
                    self._push_full(policy, version)
            except AlignerError as exc:
                failure = str(exc)
            except OSError as exc:
                failure = str(os_error(exc, self._weights_dir, "could not write the weights for the server to"))
        if distributed:
            outcome = [failure]
            torch.distributed.broadcast_object_list(outcome, src=0)
            failure = outcome[0]
        if failure is not None:
            raise AlignerError(failure)
        if self.options.weight_sync == "lora":
            self._adapter = self._adapter_name(version)
        self._synced = version

    def _adapter_name(self, version: int) -> str:
        return f"{self.options.lora_name}-{self._run_tag}-v{version}"

    def _directory(self) -> Path:
        if self._weights_dir is None:
            if self.options.weights_dir is None:
                self._weights_dir, self._temporary_dir = Path(tempfile.mkdtemp(prefix="aligner-engine-")), True
            else:
                self._weights_dir = Path(self.options.weights_dir).resolve()
                self._weights_dir.mkdir(parents=True, exist_ok=True)
        return self._weights_dir

    def _push_adapter(self, policy: torch.nn.Module, version: int) -> None:
        problem = lora_problem(policy)
        if problem is not None:
            raise AlignerError(f"generation engine 'openai_server': weight_sync 'lora' pushes the policy's LoRA "
                               f"adapter to the server, but {problem}: train a LoRA adapter (peft: {{name: lora}}) "
                               f"or use weight_sync: disk")
        name = self._adapter_name(version)
        path = self._directory() / name
        save_adapter(policy, path)
        self._post_text(f"{self.root}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        previous, self._loaded = self._loaded, name
        if previous is not None:
            self._post_text(f"{self.root}/v1/unload_lora_adapter", {"lora_name": previous})
        self._replace_written(path)

    def _push_full(self, policy: torch.nn.Module, version: int) -> None:
        if is_quantized(policy):
            raise AlignerError("generation engine 'openai_server': weight_sync 'disk' cannot save a quantized "
                               "(4-bit) policy as plain weights: use weight_sync: lora")
        path = self._directory() / f"policy-{self._run_tag}-v{version}"
        save_full(policy, path)
        url = f"{self.root}{self.options.update_endpoint}"
        answer = self._post_text(url, {"model_path": str(path)})
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("success") is False:  # SGLang answers 200 with success: false
            raise self._error(url, f"the server did not load the weights: {str(parsed.get('message'))[:300]}")
        self._replace_written(path)

    def _replace_written(self, path: Path) -> None:
        # The server has the new weights; the previous ones (unloaded) can go. The current ones stay:
        # vLLM may read an adapter again after evicting it from its cache.
        if self._written is not None and self._written != path:
            shutil.rmtree(self._written, ignore_errors=True)
        self._written = path

    # -- HTTP -------------------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.options.max_concurrency, thread_name_prefix="aligner-openai")
        return self._pool

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        name = self.options.api_key_env
        if name is not None:
            key = os.environ.get(name)
            if not key:
                raise AlignerError(f"generation engine 'openai_server': the environment variable '{name}' "
                                   f"(option api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _request(self, url: str, body: dict[str, Any] | None) -> str:
        """The text of the answer to a GET (no ``body``) or a JSON POST; every failure an ``AlignerError``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=self._headers(), method="GET" if body is None
                                         else "POST")
        # No proxies from the environment: the server is usually on this machine or its cluster, and an
        # HTTP(S)_PROXY meant for the internet would swallow 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=self.options.timeout) as response:
                return response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            raise self._error(url, f"HTTP {exc.code}: {self._detail(exc)}") from None
        except urllib.error.URLError as exc:
            raise self._error(url, self._reason(exc.reason)) from None
        except TimeoutError:
            raise self._error(url, self._reason(TimeoutError())) from None
        except OSError as exc:  # a connection reset or closed mid-answer
            raise self._error(url, f"the connection failed: {type(exc).__name__}: {exc}") from None

    def _post_json(self, url: str, body: dict[str, Any]) -> Any:
        text = self._request(url, body)
        try:
            return json.loads(text)
        except ValueError:
            raise self._error(url, f"malformed answer: not JSON ({text[:80]!r})") from None

    def _post_text(self, url: str, body: dict[str, Any]) -> str:
        return self._request(url, body)

    def _reason(self, reason: Any) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return f"connection refused: is the server running at {self.options.base_url}?"
        if isinstance(reason, TimeoutError):
            return f"no answer within {self.options.timeout:g} s (option 'timeout')"
        return f"could not reach the server: {reason}"

    def _detail(self, exc: urllib.error.HTTPError) -> str:
        try:
            text = exc.read().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        try:
            parsed = json.loads(text)
            message = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
            text = message.get("message", text) if isinstance(message, dict) else str(message)
        except ValueError:
            pass
        return str(text)[:300] or exc.reason

    def _error(self, url: str, what: str) -> AlignerError:
        # A server could echo the request's headers back: the key never reaches a message.
        key = os.environ.get(self.options.api_key_env or "") if self.options.api_key_env else None
        if key:
            what = what.replace(key, "***")
        return AlignerError(f"generation engine 'openai_server' ({url}): {what}")

    # -- the end ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Unload the adapter this run loaded (best effort), stop the request threads, remove a temporary
        weights directory."""
        if self._loaded is not None:
            try:
                self._post_text(f"{self.root}/v1/unload_lora_adapter", {"lora_name": self._loaded})
            except AlignerError as exc:
                log.warning("%s (unloading the run's adapter)", exc)
        self._adapter = self._loaded = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._temporary_dir and self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
        self._weights_dir, self._written, self._synced = None, None, None


@hookimpl
def register_generation_engines(register):
    """Register the ``openai_server`` engine."""
    register(OpenAIServerEngine)
