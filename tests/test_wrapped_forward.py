"""Under DDP the chunked and shared-prompt paths run as the wrapper's forward and leave it as it was.

Each check runs in a spawned process with a one-process gloo group, under a time limit: a DDP
wrapper that outlives its process group can hang in gloo's destructor, and that must fail a test,
not stall the suite. The child leaves with ``os._exit`` so no destructor runs after the verdict.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from aligner.data.batching import collate
from aligner.modeling.logprobs import completion_logprobs, forward_layout, plain_completion_logprobs

from .test_shared_prompt import PAD, _examples, _model


def _check_logprobs() -> None:
    model = _model()
    sentinel = model.forward  # like accelerate's mixed-precision wrapper: an instance-level forward
    model.forward = sentinel
    wrapped = DistributedDataParallel(model)
    calls = []
    wrapped.register_forward_pre_hook(lambda module, args: calls.append("ddp forward"))
    batch = collate(_examples(), "preference", PAD, share_prompt=True)
    assert forward_layout(wrapped, batch)[1] < batch["input_ids"].numel()  # packed rows are used
    got = completion_logprobs(wrapped, batch)
    assert calls == ["ddp forward"]  # DDP's own forward ran (it prepares the gradient sync)
    assert model.__dict__["forward"] is sentinel  # the instance forward is back
    got.logps.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    expected = plain_completion_logprobs(model, collate(_examples(), "preference", PAD))
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)


def _check_reward_scores() -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from aligner.modeling.reward_scores import sequence_scores

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=PAD))
    wrapped = DistributedDataParallel(model)
    calls = []
    wrapped.register_forward_pre_hook(lambda module, args: calls.append(1))
    packable = collate(_examples(), "preference", PAD, share_prompt=True)
    unpackable = dict(packable, input_ids=packable["input_ids"].clone())
    unpackable["input_ids"][5, 0] += 1  # pair 1's rejected row has another prompt
    for batch in (packable, unpackable):
        calls.clear()
        scores = sequence_scores(wrapped, batch)
        assert calls == [1]
        scores.sum().backward()
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


CHECKS = {"logprobs": _check_logprobs, "reward": _check_reward_scores}


def _in_process_group(name: str, store: str) -> None:
    """Child process: run one check in a one-process gloo group; the exit code is the verdict."""
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        CHECKS[name]()
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


def _run_isolated(name: str, tmp_path) -> None:
    process = mp.get_context("spawn").Process(target=_in_process_group, args=(name, str(tmp_path / "store")))
    process.start()
    process.join(timeout=180)
    if process.is_alive():
        process.kill()
        raise AssertionError(f"the DDP check '{name}' did not finish within 180 s")
    assert process.exitcode == 0, f"the DDP check '{name}' failed (its traceback is in the captured stderr)"


def test_ddp_model_runs_the_shared_prompt_path_through_its_own_forward(tmp_path):
    _run_isolated("logprobs", tmp_path)


def test_ddp_reward_model_runs_one_wrapper_forward_packed_or_not(tmp_path):
    """Packed or not (a batch whose pairs differ in prompt falls back), a DDP reward model's scores
    come from exactly one wrapper forward, and equal the model's own."""
    _run_isolated("reward", tmp_path)
