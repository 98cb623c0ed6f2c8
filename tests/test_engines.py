"""Generation engines: ``openai_server`` against a local OpenAI-compatible server (tests/openai_test_server.py)
on 127.0.0.1 (samples, log-probs, group order, EOS cut, LoRA and disk weight sync, errors), GRPO stages
trained through it, and the ``vllm`` engine's refusals and its use of vLLM's API (a stand-in module: the
tests have no GPU)."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import yaml

import aligner
from aligner.errors import AlignerError, ConfigError
from aligner.online.engines import GenerationRequest, build_engine
from aligner.online.engines.openai_server import ServerAnswerError, parse_choice
from aligner.online.engines.weights import full_weights
from aligner.online.sampler import sample

from .conftest import tiny_model
from .openai_test_server import CompletionsServer, load_model
from .test_online_algorithms import online_config, records

PROMPTS = ["Write a friendly greeting", "Say something kind about", "Hello"]


@pytest.fixture(scope="module")
def tokenizer():
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    return load_builtin_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny model saved in Hugging Face format: the server serves it and runs start from it."""
    from aligner.config import TinyModelConfig
    from aligner.modeling.loading import build_tiny_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny")
    build_tiny_model(TinyModelConfig(**tiny_model()["tiny"]), tokenizer, torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def server(model_dir):
    with CompletionsServer(model_dir) as running:
        yield running


@pytest.fixture
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def engine_for(server: CompletionsServer, **options):
    return build_engine({"name": "openai_server", "base_url": server.base_url, "model": "tiny", **options})


def request(prompt_ids, group=3, tokens=6, version=0, seed=7, temperature=1.0, top_p=1.0) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt_ids, samples_per_prompt=group, max_new_tokens=tokens,
                             temperature=temperature, top_p=top_p, batch_size=64, policy_version=version, seed=seed)


def forward_logps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """Each completion token's log-prob from one forward pass over prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def assert_logps_match(model, prompt_ids, generated, group) -> None:
    for row, (ids, logps) in enumerate(zip(generated.completion_ids, generated.logprobs, strict=True)):
        assert len(ids) == len(logps) > 0
        assert logps == pytest.approx(forward_logps(model, prompt_ids[row // group], ids), abs=1e-4)


def eos_tokenizer(eos: int | None):
    return SimpleNamespace(eos_token_id=eos)


# ---------------------------------------------------------------------------------------------
# Samples, log-probs, order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_ids_field, reverse", [(True, False), (False, True)])
def test_samples_and_logprobs_are_the_models_in_prompt_major_order(server, model_dir, prompt_ids, tokenizer,
                                                                   token_ids_field, reverse):
    """With ``token_ids`` in the answer, or only ``token_id:N`` tokens and choices out of order."""
    server.token_ids_field, server.reverse_choices = token_ids_field, reverse
    engine = engine_for(server)
    generated = engine.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids, top_p=0.9))
    engine.close()
    model = load_model(model_dir)
    expected = []
    for i, prompt in enumerate(prompt_ids):  # one request per prompt, seeded seed + i * G
        expected += sample(model, tokenizer, [prompt], max_new_tokens=6, temperature=1.0, top_p=0.9, batch_size=3,
                           samples_per_prompt=3, seed=7 + 3 * i).completions
    assert generated.completion_ids == expected
    assert len({tuple(c) for c in expected}) > 3  # the samples differ: the order is really checked
    assert_logps_match(model, prompt_ids, generated, group=3)
    body = next(b for b in server.requests if b["prompt"] == prompt_ids[0])  # requests arrive in any order
    assert body["n"] == 3 and body["logprobs"] == 1
    assert body["return_tokens_as_token_ids"] is True and body["top_k"] == -1
    assert body["stop_token_ids"] == [tokenizer.eos_token_id]


def test_without_n_each_sample_is_its_own_request(server, model_dir, prompt_ids, tokenizer):
    server.support_n = False
    engine = engine_for(server, use_n=False, max_concurrency=2, extra_body={"top_k": None})  # null: not sent
    generated = engine.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids, group=2))
    engine.close()
    model = load_model(model_dir)
    expected = [sample(model, tokenizer, [p], max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=1,
                       seed=7 + 2 * i + j).completions[0] for i, p in enumerate(prompt_ids) for j in range(2)]
    assert generated.completion_ids == expected
    assert len(server.requests) == 6 and all(body["n"] == 1 and "top_k" not in body for body in server.requests)
    assert_logps_match(model, prompt_ids, generated, group=2)


def test_a_completion_is_cut_after_its_first_eos(server, prompt_ids):
    """A server that ignores the stop token goes on after it; the engine cuts (EOS kept)."""
    server.ignore_stop = True
    engine = engine_for(server)
    greedy = engine.generate(torch.nn.Linear(1, 1), eos_tokenizer(None), request(prompt_ids[:1], group=1, tokens=8,
                                                                                 temperature=0.0))
    full = greedy.completion_ids[0]
    assert len(full) == 8
    eos = full[2]
    cut = engine.generate(torch.nn.Linear(1, 1), eos_tokenizer(eos), request(prompt_ids[:1], group=1, tokens=8,
                                                                            temperature=0.0))
    engine.close()
    end = full.index(eos) + 1
    assert cut.completion_ids == [full[:end]] and cut.logprobs == [greedy.logprobs[0][:end]]


def test_choice_parsing_reads_token_ids_and_refuses_text():
    logprobs = {"tokens": ["token_id:5", "token_id:9"], "token_logprobs": [-0.5, -1.25]}
    assert parse_choice({"logprobs": logprobs}) == ([5, 9], [-0.5, -1.25])
    assert parse_choice({"token_ids": [5, 9], "logprobs": logprobs}) == ([5, 9], [-0.5, -1.25])
    with pytest.raises(ServerAnswerError, match="token text"):
        parse_choice({"logprobs": {"tokens": ["Hello", " world"], "token_logprobs": [-0.5, -1.0]}})
    with pytest.raises(ServerAnswerError, match="2 tokens but 1 log-probs"):
        parse_choice({"token_ids": [5, 9], "logprobs": {"token_logprobs": [-0.5]}})
    with pytest.raises(ServerAnswerError, match="ignored 'logprobs'"):
        parse_choice({"token_ids": [5], "logprobs": None})


# ---------------------------------------------------------------------------------------------
# Weight sync
# ---------------------------------------------------------------------------------------------


def lora_policy(model_dir) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(load_model(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def perturb(module: torch.nn.Module, pattern: str, seed: int) -> None:
    """Stand-in for an optimizer update: change the parameters whose name contains ``pattern``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if pattern in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_lora_sync_loads_the_adapter_after_each_update_and_requests_use_it(server, model_dir, prompt_ids,
                                                                          tokenizer, tmp_path):
    policy = lora_policy(model_dir)
    engine = engine_for(server, weight_sync="lora", weights_dir=str(tmp_path / "weights"))
    engine.generate(policy, tokenizer, request(prompt_ids, version=0))
    [(kind, first)] = server.events
    assert kind == "load"
    assert server.requests[-1]["model"] == first
    perturb(policy, "lora_B", seed=1)  # the update
    engine.generate(policy, tokenizer, request(prompt_ids, version=0))  # same version: no sync
    assert len(server.events) == 1
    generated = engine.generate(policy, tokenizer, request(prompt_ids, version=1))
    [_, (load, second), (unload, unloaded)] = server.events
    assert (load, unload) == ("load", "unload") and unloaded == first and second != first
    assert server.requests[-1]["model"] == second
    # The server's samples now come from the updated adapter: its log-probs are the policy's own.
    assert_logps_match(policy, prompt_ids, generated, group=3)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == [second]  # the unloaded adapter's files are gone
    engine.close()
    assert server.events[-1] == ("unload", second) and not server.adapters


def test_with_several_processes_one_pushes_and_all_request_its_adapter(server, model_dir, prompt_ids, tokenizer,
                                                                      monkeypatch):
    """Two processes in turn, with torch.distributed's calls stood in for: process 0's adapter name is
    broadcast, process 0 alone saves and loads it, both request it."""
    rank = {"now": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank["now"])
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    sent: list = []  # what process 0 broadcast, in order; each process reads the broadcasts in turn
    received = {0: 0, 1: 0}

    def broadcast_object_list(objects, src):
        if rank["now"] == src:
            sent.append(objects[0])
        objects[0] = sent[received[rank["now"]]]
        received[rank["now"]] += 1

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    policy = lora_policy(model_dir)
    engines = [engine_for(server, weight_sync="lora"), engine_for(server, weight_sync="lora")]
    for version in (0, 1):
        perturb(policy, "lora_B", seed=version)
        for rank["now"], engine in enumerate(engines):
            engine.generate(policy, tokenizer, request(prompt_ids[:1], group=2, version=version))
        assert engines[0]._adapter == engines[1]._adapter == server.events[-2 if version else -1][1]
    assert [kind for kind, _ in server.events] == ["load", "load", "unload"]
    assert [b["model"] for b in server.requests] == [server.events[0][1]] * 2 + [server.events[1][1]] * 2
    for rank["now"], engine in enumerate(engines):
        engine.close()
    assert [kind for kind, _ in server.events] == ["load", "load", "unload", "unload"]  # process 0's only


def test_lora_sync_of_a_policy_without_an_adapter_is_a_clear_error(server, model_dir, prompt_ids, tokenizer):
    engine = engine_for(server, weight_sync="lora")
    with pytest.raises(AlignerError, match="weight_sync 'lora'.*not a PEFT model.*weight_sync: disk"):
        engine.generate(load_model(model_dir), tokenizer, request(prompt_ids))
    engine.close()


@pytest.mark.parametrize("peft", [False, True])
def test_disk_sync_reloads_the_full_weights_merged_and_leaves_the_policy_untouched(server, model_dir, prompt_ids,
                                                                                  tokenizer, peft):
    policy = lora_policy(model_dir) if peft else load_model(model_dir)
    perturb(policy, "lora_B" if peft else "mlp", seed=2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    engine = engine_for(server, weight_sync="disk", update_endpoint="/update_weights_from_disk")
    generated = engine.generate(policy, tokenizer, request(prompt_ids, version=3))
    [(kind, path)] = server.events
    assert kind == "update"
    assert_logps_match(policy, prompt_ids, generated, group=3)
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the policy's weights changed"
    with full_weights(policy) as (_, state):
        served = server.model.state_dict()
        assert all(torch.allclose(state[k], served[k], atol=1e-6) for k in served)
    engine.generate(policy, tokenizer, request(prompt_ids, version=4))
    assert len(server.events) == 2 and not Path(path).exists()  # the previous weights are removed
    engine.close()


def test_disk_sync_that_the_server_refuses_is_an_error(server, model_dir, prompt_ids, tokenizer):
    server.update_weights_from_disk = lambda body: (200, {"success": False, "message": "out of memory"})
    engine = engine_for(server, weight_sync="disk")
    with pytest.raises(AlignerError, match=r"update_weights_from_disk\): the server did not load the weights: out of"):
        engine.generate(load_model(model_dir), tokenizer, request(prompt_ids))
    engine.close()


def test_without_sync_the_server_is_off_policy_after_an_update_and_says_so_once(server, prompt_ids, tokenizer,
                                                                               caplog):
    engine = engine_for(server)
    with caplog.at_level(logging.WARNING, logger="aligner"):
        for version in (0, 0, 1, 2):
            engine.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids[:1], version=version))
    engine.close()
    warnings = [r for r in caplog.records if "off-policy" in r.getMessage()]
    assert len(warnings) == 1 and server.base_url in warnings[0].getMessage()
    assert not server.events


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_errors_name_the_engine_the_url_and_what_failed(server, prompt_ids, tokenizer):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    down = build_engine({"name": "openai_server", "base_url": url, "model": "tiny"})
    with pytest.raises(AlignerError, match=rf"generation engine 'openai_server' \({url}/completions\): connection "
                                           rf"refused: is the server running"):
        down.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids))
    wrong_model = engine_for(server, model="nope")
    with pytest.raises(AlignerError, match=r"/v1/completions\): HTTP 404: The model `nope` does not exist"):
        wrong_model.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids))
    text_tokens = engine_for(server, extra_body={"return_tokens_as_token_ids": False, "return_token_ids": False})
    with pytest.raises(AlignerError, match=r"/v1/completions\): malformed answer: the server returned token text"):
        text_tokens.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids))
    server.delay = 1.0
    slow = engine_for(server, timeout=0.2)
    with pytest.raises(AlignerError, match=r"no answer within 0.2 s \(option 'timeout'\)"):
        slow.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids[:1], group=1))
    for engine in (down, wrong_model, text_tokens, slow):
        engine.close()


def test_the_api_key_comes_from_the_named_variable_and_never_appears(model_dir, prompt_ids, tokenizer,
                                                                    monkeypatch):
    with CompletionsServer(model_dir, api_key="s3cret-key") as server:
        monkeypatch.setenv("TEST_ENGINE_KEY", "s3cret-key")
        engine = engine_for(server, api_key_env="TEST_ENGINE_KEY")
        engine.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids[:1]))
        assert server.headers[-1]["Authorization"] == "Bearer s3cret-key"
        # The server also echoes the key back in its error: the message still never shows it.
        server.completions = lambda body: (401, {"error": {"message": "bad key s3cret-key"}})
        with pytest.raises(AlignerError) as caught:
            engine.generate(torch.nn.Linear(1, 1), tokenizer, request(prompt_ids[:1]))
        assert "HTTP 401: bad key ***" in str(caught.value) and "s3cret" not in str(caught.value)
        engine.close()
        stage = SimpleNamespace(index=0, name="grpo", peft=SimpleNamespace(name="full"), config=None)
        monkeypatch.delenv("TEST_ENGINE_KEY")
        with pytest.raises(ConfigError, match=r"'stages\[0\]\.algorithm\.engine\.api_key_env' names the environment "
                                              r"variable 'TEST_ENGINE_KEY', which is not set"):
            engine.check_stage(stage)


def test_engine_option_errors_name_the_key(tmp_path):
    from aligner.config import load_config
    from aligner.training.stages import prepare_stages

    good = {"name": "openai_server", "base_url": "http://127.0.0.1:8000/v1"}
    cases = [({**good, "timeout": -1}, r"stages\[0\]\.algorithm.*engine\.timeout"),
             ({**good, "max_concurency": 4}, r"stages\[0\]\.algorithm.*engine\.max_concurency"),
             ({**good, "weight_sync": "nccl"}, r"stages\[0\]\.algorithm.*engine\.weight_sync"),
             ({**good, "api_key_env": "sk-live-123"}, r"engine\.api_key_env'.*: .*name of an environment variable"),
             ({"name": "openai_server"}, r"stages\[0\]\.algorithm.*engine\.base_url"),
             ({**good, "weight_sync": "lora"}, r"'stages\[0\]\.algorithm\.engine\.weight_sync' is 'lora'.*"
                                               r"'stages\[0\]\.peft' trains the full model"),
             ({"name": "vllm", "gpu_memory_utilization": 2}, r"engine\.gpu_memory_utilization")]
    for engine, message in cases:
        config = online_config(tmp_path, {"name": "grpo", "group_size": 2, "engine": engine})
        with pytest.raises(ConfigError, match=message):
            prepare_stages(load_config(config))


# ---------------------------------------------------------------------------------------------
# GRPO through the engine
# ---------------------------------------------------------------------------------------------


def engine_run_config(tmp_path, model_dir, engine: dict, steps: int = 2, **stage) -> dict:
    config = online_config(tmp_path, {"name": "grpo", "group_size": 2, "engine": engine}, steps=steps, batch_size=2,
                           n_prompts=8, **stage)
    config["model"] = {"path": str(model_dir)}  # the weights the server serves
    return config


def logp_diffs(result) -> list[float]:
    steps = [r for r in records(result) if "loss" in r]
    assert steps and all("rollout/logp_diff" in r for r in steps), "rollout/logp_diff is not logged"
    return [r["rollout/logp_diff"] for r in steps]


def test_grpo_trains_on_the_server_and_the_logprob_gap_shows_its_stale_weights(server, model_dir, tmp_path):
    engine = {"name": "openai_server", "base_url": server.base_url}  # the model name from GET /models
    result = aligner.train(engine_run_config(tmp_path, model_dir, engine))
    first, second = logp_diffs(result)
    assert first < 1e-5  # the server serves the run's starting weights
    assert second > 1e-3  # weight_sync none: after the update the server samples the old policy
    assert len(server.requests) == 4 and all(b["model"] == "tiny" and b["n"] == 2 for b in server.requests)


def test_grpo_with_lora_sync_samples_every_step_from_the_updated_adapter(server, model_dir, tmp_path):
    engine = {"name": "openai_server", "base_url": server.base_url, "model": "tiny", "weight_sync": "lora"}
    result = aligner.train(engine_run_config(tmp_path, model_dir, engine, peft={"name": "lora", "r": 4}))
    loads = [name for kind, name in server.events if kind == "load"]
    assert len(loads) == 2 and ("unload", loads[0]) in server.events  # before step 1, and after its update
    assert [b["model"] for b in server.requests] == [loads[0]] * 2 + [loads[1]] * 2
    assert all(gap < 1e-5 for gap in logp_diffs(result))  # the generator is the trained policy


def test_grpo_with_disk_sync_reloads_the_server_after_every_update(server, model_dir, tmp_path):
    engine = {"name": "openai_server", "base_url": server.base_url, "model": "tiny", "weight_sync": "disk"}
    result = aligner.train(engine_run_config(tmp_path, model_dir, engine))
    assert [kind for kind, _ in server.events] == ["update", "update"]
    final = load_model(result.final_model_dir)
    served = server.model.state_dict()
    # The second rollout's weights are the policy after step 1; the run then made one more update.
    assert any(not torch.equal(v, served[k]) for k, v in final.state_dict().items())
    assert all(gap < 1e-5 for gap in logp_diffs(result))


def test_a_server_that_is_down_stops_the_cli_with_one_located_line(model_dir, tmp_path, capsys):
    from aligner.cli import main

    url = f"http://127.0.0.1:{closed_port()}/v1"
    config = engine_run_config(tmp_path, model_dir, {"name": "openai_server", "base_url": url, "model": "tiny"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("aligner: error: ")]
    assert len(lines) == 1, err
    assert f"generation engine 'openai_server' ({url}/completions): connection refused" in lines[0]


# ---------------------------------------------------------------------------------------------
# vllm: refused without CUDA or vLLM; its use of vLLM's API against a stand-in module
# ---------------------------------------------------------------------------------------------


def test_vllm_is_refused_without_cuda_or_without_vllm_naming_the_key(tmp_path, monkeypatch):
    import importlib.util

    from aligner.config import load_config
    from aligner.training.stages import prepare_stages

    config = load_config(online_config(tmp_path, {"name": "grpo", "group_size": 2, "engine": {"name": "vllm"}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"the generation engine 'vllm' \('stages\[0\]\.algorithm\.engine'\) needs "
                                          r"a CUDA GPU"):
        prepare_stages(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"\('stages\[0\]\.algorithm\.engine'\) needs vLLM, which is not "
                                          r"installed: pip install 'aligner-trainer\[vllm\]'"):
        prepare_stages(config)


class FakeLLM:
    """Just enough of ``vllm.LLM`` for the engine: built from a directory, ``generate`` on token-id
    prompts with ``SamplingParams``, ``apply_model`` on a model with ``load_weights``."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        self.kwargs = {"model": model, **kwargs}
        self.hf = load_model(model)
        self.loaded: list[set[str]] = []
        self.prefix_resets = 0
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        outputs = []
        for i, prompt in enumerate(prompts):
            p = params[i] if isinstance(params, list) else params
            eos = p["stop_token_ids"][0]
            got = sample(self.hf, SimpleNamespace(pad_token_id=0, eos_token_id=eos), [prompt["prompt_token_ids"]],
                         max_new_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"], batch_size=8,
                         samples_per_prompt=p["n"], seed=p["seed"])
            # vLLM's shape: a prompt's outputs, each with token_ids and per-step {token: Logprob}.
            completions = [SimpleNamespace(index=j, token_ids=tuple(ids),
                                           logprobs=[{t: SimpleNamespace(logprob=v)} for t, v in zip(ids, lps, strict=True)])
                           for j, (ids, lps) in enumerate(zip(got.completions, got.logprobs, strict=True))]
            outputs.append(SimpleNamespace(outputs=completions[::-1]))  # out of order: the engine sorts by index
        return outputs

    def apply_model(self, func):
        llm = self

        class Model:
            def load_weights(self, weights):
                state = dict(weights)
                llm.hf.load_state_dict(state, strict=False)
                llm.loaded.append(set(state))
                return set(state)

        return [func(Model())]

    def reset_prefix_cache(self):
        self.prefix_resets += 1


def test_vllm_engine_drives_the_llm_api_and_pushes_weights_after_an_update(monkeypatch, model_dir, prompt_ids,
                                                                          tokenizer):
    fake = ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    FakeLLM.instances.clear()
    policy = lora_policy(model_dir)
    perturb(policy, "lora_B", seed=3)
    engine = build_engine({"name": "vllm", "gpu_memory_utilization": 0.5})
    generated = engine.generate(policy, tokenizer, request(prompt_ids, version=0))
    [llm] = FakeLLM.instances
    assert llm.kwargs["gpu_memory_utilization"] == 0.5 and llm.kwargs["dtype"] == "float32"
    assert_logps_match(policy, prompt_ids, generated, group=3)  # built from the merged weights
    assert llm.loaded == []
    perturb(policy, "lora_B", seed=4)  # the update
    generated = engine.generate(policy, tokenizer, request(prompt_ids, version=1))
    assert len(llm.loaded) == 1 and llm.prefix_resets == 1
    assert not any("lora" in name or "base_layer" in name for name in llm.loaded[0])
    assert_logps_match(policy, prompt_ids, generated, group=3)
    directory = engine._directory
    engine.close()
    assert not directory.exists()


def test_merged_weights_save_and_reload_as_the_peft_models_outputs(model_dir, prompt_ids, tmp_path):
    from aligner.online.engines.weights import save_full

    policy = lora_policy(model_dir)
    perturb(policy, "lora_B", seed=5)
    save_full(policy, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"
    merged = load_model(tmp_path / "merged")
    ids = torch.tensor([prompt_ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert any("lora_A" in name for name, _ in policy.named_parameters())  # still the PEFT model


def test_a_key_pasted_into_api_key_env_never_appears_in_the_error(tmp_path):
    from aligner.config import load_config
    from aligner.errors import ConfigError
    from aligner.training.stages import prepare_stages
    from tests.test_online_algorithms import online_config

    engine = {"name": "openai_server", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "sk-pasted-SECRET-123"}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.algorithm\.engine.*api_key_env.*not the key") as info:
        prepare_stages(load_config(online_config(tmp_path, {"name": "grpo", "engine": engine})))
    assert "SECRET" not in str(info.value)
