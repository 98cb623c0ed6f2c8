"""A small OpenAI-compatible completions server for the tests of the ``openai_server`` engine.

It serves a tiny causal LM loaded from a directory on 127.0.0.1 the way ``vllm serve`` answers
aligner's requests, sampling with aligner's own sampler (so a seeded request is reproducible here):

- ``POST /v1/completions``: token-id prompts (one or a list), ``n``, ``max_tokens``, ``temperature``,
  ``top_p``, ``seed``, ``stop_token_ids``, ``logprobs`` (the sampled tokens' raw log-probs), vLLM's
  ``return_tokens_as_token_ids`` (``"token_id:N"`` tokens) and ``return_token_ids`` (``token_ids``);
  choices numbered prompt-major (``index = prompt * n + sample``);
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's runtime LoRA): requests that name
  a loaded adapter sample from the base model with it;
- ``POST /update_weights_from_disk`` (SGLang's): reload the base model from ``model_path``;
- ``GET /v1/models``.

Switches on the instance make it behave like other servers (no ``n``, no ``token_ids`` field, choices
out of order, stop tokens ignored, slow). Everything it was asked is recorded for the tests.

Run it by hand: ``python tests/openai_test_server.py MODEL_DIR --port 8000``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from aligner.online.sampler import sample


def load_model(directory: str | Path) -> torch.nn.Module:
    """A causal LM from a Hugging Face directory, in float32, for sampling."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


class CompletionsServer:
    """The server: ``start()`` returns its ``base_url`` (``http://127.0.0.1:PORT/v1``); ``stop()`` ends it."""

    def __init__(self, model_dir: str | Path, served_name: str = "tiny", api_key: str | None = None):
        self.model = load_model(model_dir)
        self.served_name = served_name
        self.api_key = api_key
        self.adapters: dict[str, torch.nn.Module] = {}
        self.events: list[tuple[str, str]] = []  # ("load" | "unload", adapter) and ("update", path)
        self.requests: list[dict[str, Any]] = []  # every completions body, in arrival order
        self.headers: list[dict[str, str]] = []
        # how it behaves
        self.support_n = True
        self.token_ids_field = True
        self.reverse_choices = False
        self.ignore_stop = False
        self.delay = 0.0
        self._lock = threading.Lock()  # one forward at a time (and the sampler's RNG fork is global)
        self._rng = random.Random(0)
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, port: int = 0) -> str:
        """Serve on 127.0.0.1 (a free port unless ``port``) in a background thread; return the base URL."""
        self._http = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._http.daemon_threads = True
        self._http.app = self  # type: ignore[attr-defined]
        # A short poll interval: stop() returns within 50 ms instead of serve_forever's default 0.5 s.
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-test-server", daemon=True)
        self._thread.start()
        return self.base_url

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        assert self._http is not None
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> CompletionsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- endpoints: each returns (status, JSON-able answer or text) -----------------------------

    def completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        """``/v1/completions``."""
        self.requests.append(body)
        if self.delay:
            time.sleep(self.delay)
        name = body.get("model")
        model = self.model if name == self.served_name else self.adapters.get(name)
        if model is None:
            return 404, _error(f"The model `{name}` does not exist.", 404)
        prompts = body.get("prompt")
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
            return 400, _error("this server takes token-id prompts only", 400)
        n = int(body.get("n", 1))
        if n > 1 and not self.support_n:
            return 400, _error("n > 1 is not supported", 400)
        stop = body.get("stop_token_ids") or [self.model.config.eos_token_id]
        eos = -1 if self.ignore_stop else stop[0]  # -1: never sampled, so the sampler never stops
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        seed = body.get("seed")
        with self._lock:
            seed = self._rng.randrange(2**31) if seed is None else int(seed)
            samples = sample(model, SimpleNamespace(pad_token_id=pad, eos_token_id=eos), prompts,
                             max_new_tokens=int(body.get("max_tokens", 16)), temperature=float(body.get("temperature", 1.0)),
                             top_p=float(body.get("top_p", 1.0)), batch_size=len(prompts) * n, samples_per_prompt=n,
                             seed=seed)
        choices = []
        for index, (ids, logps) in enumerate(zip(samples.completions, samples.logprobs, strict=True)):
            choice: dict[str, Any] = {"index": index, "text": "".join(f"<{t}>" for t in ids),
                                      "finish_reason": "stop" if ids and ids[-1] in stop else "length"}
            if body.get("logprobs") is not None:
                as_ids = body.get("return_tokens_as_token_ids")
                choice["logprobs"] = {"tokens": [f"token_id:{t}" if as_ids else f"<{t}>" for t in ids],
                                      "token_logprobs": logps, "text_offset": list(range(len(ids))),
                                      "top_logprobs": [{f"token_id:{t}": v} for t, v in zip(ids, logps, strict=True)]}
            if body.get("return_token_ids") and self.token_ids_field:
                choice["token_ids"] = ids
            choices.append(choice)
        if self.reverse_choices:
            choices.reverse()
        return 200, {"id": "cmpl-test", "object": "text_completion", "model": name, "choices": choices}

    def load_lora_adapter(self, body: dict[str, Any]) -> tuple[int, Any]:
        """``/v1/load_lora_adapter`` (answers in text, as vLLM does)."""
        from peft import PeftModel

        name, path = body.get("lora_name"), body.get("lora_path")
        if name in self.adapters:
            return 400, _error(f"The lora adapter '{name}' has already been loaded.", 400)
        with self._lock:
            self.adapters[name] = PeftModel.from_pretrained(copy.deepcopy(self.model), path).eval()
        self.events.append(("load", name))
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora_adapter(self, body: dict[str, Any]) -> tuple[int, Any]:
        """``/v1/unload_lora_adapter``."""
        name = body.get("lora_name")
        if self.adapters.pop(name, None) is None:
            return 404, _error(f"The lora adapter '{name}' cannot be found.", 404)
        self.events.append(("unload", name))
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def update_weights_from_disk(self, body: dict[str, Any]) -> tuple[int, Any]:
        """SGLang's ``/update_weights_from_disk``: reload the served model from ``model_path``."""
        path = body.get("model_path")
        if not path or not Path(path).is_dir():
            return 200, {"success": False, "message": f"no model at {path}"}
        with self._lock:
            self.model = load_model(path)
        self.events.append(("update", path))
        return 200, {"success": True, "message": "Succeeded to update model weights."}

    def models(self) -> tuple[int, Any]:
        """``GET /v1/models``."""
        return 200, {"object": "list", "data": [{"id": self.served_name, "object": "model"}]}


def _error(message: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "code": code}}


class _Handler(BaseHTTPRequestHandler):
    routes = {"/v1/completions": "completions", "/v1/load_lora_adapter": "load_lora_adapter",
              "/v1/unload_lora_adapter": "unload_lora_adapter", "/update_weights_from_disk": "update_weights_from_disk"}

    @property
    def app(self) -> CompletionsServer:
        return self.server.app  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._answer(*self.app.models())
        else:
            self._answer(404, _error(f"no route {self.path}", 404))

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if not self._authorized():
            return
        route = self.routes.get(self.path)
        if route is None:
            self._answer(404, _error(f"no route {self.path}", 404))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._answer(400, _error("the body is not JSON", 400))
            return
        self._answer(*getattr(self.app, route)(body))

    def _authorized(self) -> bool:
        self.app.headers.append(dict(self.headers))
        if self.app.api_key is None or self.headers.get("Authorization") == f"Bearer {self.app.api_key}":
            return True
        self._answer(401, _error("invalid API key", 401))
        return False

    def _answer(self, status: int, answer: Any) -> None:
        text = answer if isinstance(answer, str) else json.dumps(answer)
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # quiet: the tests read the recorded requests instead


def main() -> None:
    """Serve a model directory until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default="tiny", help="the served model name")
    args = parser.parse_args()
    server = CompletionsServer(args.model_dir, served_name=args.name)
    print(f"serving {args.model_dir} as '{args.name}' at {server.start(args.port)}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
