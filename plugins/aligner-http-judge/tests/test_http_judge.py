"""The HTTP judge against a real local server (127.0.0.1, started here) that can misbehave."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files

import pytest
from aligner_http_judge import HTTPJudge, JudgeRequestError, parse_choice, parse_score

import aligner
from aligner.errors import ConfigError
from aligner.plugins import get_registry, reset_plugins

KEY = "sk-test-5ecret-value-123"
KEY_ENV = "MY_JUDGE_KEY"

# A reply is ("ok", text) | ("status", code, body) | ("sleep", seconds, text) | ("raw", bytes).
Script = Callable[[int, str], tuple]


class JudgeServer:
    """An OpenAI-style chat-completions endpoint whose every answer is decided by ``script``."""

    def __init__(self) -> None:
        self.script: Script = lambda n, content: ("ok", "Score: 5")
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(server.script(n, body["messages"][-1]["content"]))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, action: tuple) -> None:
                kind = action[0]
                if kind == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                    kind = "ok"
                if kind == "ok":
                    payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                               "content": action[1]}}]}).encode()
                    status = 200
                elif kind == "status":
                    status, payload = action[1], action[2].encode()
                else:
                    status, payload = 200, action[1]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    s = JudgeServer()
    yield s
    s.close()


@pytest.fixture
def make_judge(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    delays: list[float] = []

    def build(**options) -> HTTPJudge:
        settings = {"base_url": server.base_url, "model": "judge-7b", "api_key_env": KEY_ENV, "backoff": 0.05,
                    "max_retries": 2, "timeout": 2.0, **options}
        judge = HTTPJudge(HTTPJudge.Options(**settings))
        judge.client.sleep = delays.append  # record the backoff instead of waiting
        judge.delays = delays
        return judge

    return build


def completion_of(content: str) -> str:
    return re.search(r"\[Response\]\n(.*)$", content, re.DOTALL).group(1)


def test_scores_are_read_normalised_and_sent_with_the_key_from_the_named_variable(server, make_judge):
    replies = {"great": "Score: 10", "poor": "I would rate it 2/10.", "fine": '{"score": 5.5}', "ok": "**Score:** 7"}
    server.script = lambda n, content: ("ok", replies[completion_of(content)])
    judge = make_judge()
    scores = judge.score(["p0", "p1", "p2", "p3"], ["great", "poor", "fine", "ok"])
    assert scores == pytest.approx([1.0, 1 / 9, 4.5 / 9, 6 / 9])
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "judge-7b" and request["body"]["temperature"] == 0.0
    user = request["body"]["messages"][-1]["content"]
    assert "Score: N" in user and "from 1 (worst) to 10 (best)" in user


def test_no_key_sent_when_api_key_env_is_null(server, make_judge):
    judge = make_judge(api_key_env=None, normalize=False)
    assert judge.score(["p"], ["c"]) == [5.0]
    assert "Authorization" not in server.requests[0]["headers"]


def test_server_errors_are_retried_with_exponential_backoff(server, make_judge):
    server.script = lambda n, content: ("status", 500, "overloaded") if n < 3 else ("ok", "Score: 10")
    judge = make_judge(max_retries=3, backoff=0.5, backoff_max=100)
    assert judge.score(["p"], ["c"]) == [1.0]
    assert len(server.requests) == 4
    assert len(judge.delays) == 3
    for delay, expected in zip(judge.delays, (0.5, 1.0, 2.0), strict=True):
        assert 0.8 * expected <= delay <= 1.2 * expected


def test_retry_after_header_of_429_is_honoured_and_capped(server, make_judge):
    judge = make_judge(backoff_max=3.0)
    # A 429 without Retry-After uses the backoff; the client reads Retry-After when given.
    server.script = lambda n, content: ("status", 429, "slow down") if n == 0 else ("ok", "Score: 1")
    assert judge.score(["p"], ["c"]) == [0.0]
    assert 0.04 <= judge.delays[0] <= 0.06


def test_persistent_500_gives_a_clear_error_naming_the_prompt_index(server, make_judge):
    server.script = lambda n, content: (("status", 500, "internal error") if completion_of(content) == "boom"
                                        else ("ok", "Score: 5"))
    judge = make_judge(max_retries=2)
    with pytest.raises(JudgeRequestError) as info:
        judge.score(["p0", "p1", "p2"], ["fine", "fine", "boom"])
    message = str(info.value)
    assert message.startswith("http judge: prompt 2: HTTP 500")
    assert "gave up after 3 attempts" in message and server.base_url in message
    assert sum(completion_of(r["body"]["messages"][-1]["content"]) == "boom" for r in server.requests) == 3


def test_malformed_json_is_retried_then_reported(server, make_judge):
    server.script = lambda n, content: ("raw", b'{"choices": [oops')
    with pytest.raises(JudgeRequestError, match=r"prompt 0: malformed response \(not chat-completions JSON\)"):
        make_judge(max_retries=1).score(["p"], ["c"])
    assert len(server.requests) == 2


def test_json_without_a_message_is_malformed_too(server, make_judge):
    server.script = lambda n, content: ("raw", b'{"error": "no"}')
    with pytest.raises(JudgeRequestError, match="prompt 0: malformed response"):
        make_judge(max_retries=0).score(["p"], ["c"])


def test_a_server_that_hangs_times_out_and_is_retried(server, make_judge):
    server.script = lambda n, content: ("sleep", 1.0, "Score: 9") if n == 0 else ("ok", "Score: 9")
    judge = make_judge(timeout=0.2)
    started = time.perf_counter()
    assert judge.score(["p"], ["c"]) == [pytest.approx(8 / 9)]
    assert time.perf_counter() - started < 1.0
    assert len(server.requests) == 2


def test_a_server_that_always_hangs_gives_a_timeout_error(server, make_judge):
    server.script = lambda n, content: ("sleep", 0.6, "Score: 9")
    with pytest.raises(JudgeRequestError, match=r"prompt 0: timed out after 0.15 s .*gave up after 2 attempts"):
        make_judge(timeout=0.15, max_retries=1).score(["p"], ["c"])


def test_unreadable_replies_are_retried_then_reported(server, make_judge):
    server.script = lambda n, content: ("ok", "I cannot judge this.") if n < 2 else ("ok", "Score: 10")
    assert make_judge(max_retries=2).score(["p"], ["c"]) == [1.0]
    server.requests.clear()
    server.script = lambda n, content: ("ok", "Score: 42")
    with pytest.raises(JudgeRequestError, match=r"prompt 0: score 42 is outside \[1, 10\]"):
        make_judge(max_retries=1).score(["p"], ["c"])


def test_authentication_failure_is_not_retried_and_never_shows_the_key(server, make_judge):
    # A careless server echoes the Authorization header in its error body.
    server.script = lambda n, content: ("status", 401, f"bad credentials: Bearer {KEY}")
    with pytest.raises(JudgeRequestError) as info:
        make_judge().score(["p"], ["c"])
    message = str(info.value)
    assert len(server.requests) == 1
    assert "HTTP 401" in message and KEY_ENV in message and "***" in message
    assert KEY not in message


def test_the_key_is_never_in_logs_repr_or_options(server, make_judge, caplog):
    server.script = lambda n, content: ("status", 503, f"echo {KEY}") if n == 0 else ("ok", "Score: 3")
    judge = make_judge()
    with caplog.at_level("WARNING", logger="aligner"):
        judge.score(["p"], ["c"])
    assert "retrying" in caplog.text and "HTTP 503" in caplog.text
    for text in (caplog.text, repr(judge), repr(judge.client), judge.options.model_dump_json(), str(vars(judge))):
        assert KEY not in text


def test_concurrency_is_bounded(server, make_judge):
    server.script = lambda n, content: ("sleep", 0.15, "Score: 5")
    judge = make_judge(max_concurrency=3)
    started = time.perf_counter()
    assert len(judge.score([f"p{i}" for i in range(9)], ["c"] * 9)) == 9
    assert server.max_in_flight == 3
    assert time.perf_counter() - started < 9 * 0.15  # really concurrent


def test_pairwise_compare_swaps_positions_to_cancel_bias(server, make_judge):
    def prefers_polite(n, content):
        a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", content, re.DOTALL).group(1)
        return ("ok", "A" if a == "polite" else "Response B is better.")

    server.script = prefers_polite
    judge = make_judge()
    assert judge.compare(["p", "q"], ["polite", "rude"], ["rude", "polite"]) == [1.0, 0.0]
    assert len(server.requests) == 4
    server.script = lambda n, content: ("ok", "A")  # a judge that always picks the first position
    assert judge.compare(["p"], ["polite"], ["rude"]) == [0.5]
    assert make_judge(swap=False).compare(["p"], ["polite"], ["rude"]) == [1.0]


def test_missing_key_variable_and_bad_options_are_config_errors(monkeypatch):
    monkeypatch.delenv("ABSENT_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="environment variable ABSENT_KEY_VAR .* is not set"):
        HTTPJudge(HTTPJudge.Options(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="ABSENT_KEY_VAR"))
    # A key pasted where the variable's name belongs is refused without being echoed.
    with pytest.raises(ConfigError) as info:
        HTTPJudge(HTTPJudge.Options(base_url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY))
    assert KEY not in str(info.value) and "NAME of an environment variable" in str(info.value)
    with pytest.raises(ValueError, match="http:// or https://"):
        HTTPJudge.Options(base_url="file:///etc/passwd", model="m")
    with pytest.raises(ValueError, match="lacks the placeholder"):
        HTTPJudge.Options(base_url="http://x/v1", model="m", template="Rate {prompt}")


@pytest.mark.parametrize(("reply", "expected"), [
    ("Score: 7", 7.0), ("score=8.5", 8.5), ("**Rating:** 3", 3.0), ("7/10", 7.0), ("I'd give it 6 out of 10.", 6.0),
    ('{"score": 4}', 4.0), ('```json\n{"rating": 9}\n```', 9.0), ("9", 9.0), ("Step 1 done. Score: 2", 2.0),
])
def test_parse_score_accepts_common_reply_shapes(reply, expected):
    assert parse_score(reply, 1, 10) == (expected, "")


@pytest.mark.parametrize(("reply", "reason"), [
    ("no idea", "no score"), ("between 3 and 4", "several numbers"), ("Score: 11", "outside"), ("0/10", "outside"),
])
def test_parse_score_refuses_to_guess(reply, reason):
    value, why = parse_score(reply, 1, 10)
    assert value is None and reason in why


@pytest.mark.parametrize(("reply", "expected"), [
    ("A", "A"), (" b. ", "B"), ("Response B is better.", "B"), ("The better answer is (A)", "A"),
    ("I prefer B", "B"), ("Both are bad", None),
])
def test_parse_choice(reply, expected):
    assert parse_choice(reply)[0] == expected


def test_registered_through_its_entry_point():
    reset_plugins()
    entry = get_registry("judge").entry("http")
    assert entry.obj is HTTPJudge and entry.plugin == "http_judge"


def test_judges_generations_in_a_real_run_and_writes_no_key(server, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.script = lambda n, content: ("ok", "Score: 8")
    data = files("aligner.quickstart") / "data"
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "tokenizer": "builtin",
        "stages": [{
            "name": "sft",
            "data": {"train": str(data / "sft_train.jsonl"), "eval": str(data / "sft_eval.jsonl"),
                     "template": "plain", "max_length": 48, "max_rows": 32},
            "losses": [{"name": "sft"}],
            "train": {"max_steps": 1, "batch_size": 8},
            "eval": {"at_start": False, "generate": {
                "judge": {"name": "http", "base_url": server.base_url, "model": "judge-7b", "api_key_env": KEY_ENV},
                "num_prompts": 4, "max_new_tokens": 4}},
        }],
    }
    reset_plugins()
    result = aligner.train(config)
    assert result.final_metrics["eval/judge_score"] == pytest.approx(7 / 9)
    assert len(server.requests) == 4
    written = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.suffix in (".yaml", ".json", ".jsonl"))
    assert KEY_ENV in written and KEY not in written
    captured = capfd.readouterr()
    assert KEY not in captured.out + captured.err
