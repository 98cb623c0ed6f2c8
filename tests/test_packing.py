"""SFT packing (``data.packing``): several sequences per row, the same values as one row each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import aligner
from aligner.cli import main
from aligner.data.batching import collate
from aligner.data.packing import first_fit_decreasing, pack_sequences
from aligner.modeling.logprobs import (
    chunked_completion_logprobs,
    decoder_and_head,
    forward_layout,
)
from aligner.modeling.segment_attention import ENV as SEGMENTS_ENV

VOCAB = 300
PAD = 0
# (prompt, completion) lengths: unequal, so the padded batch wastes positions that packing saves
SHAPES = [(5, 12), (1, 3), (7, 2), (2, 9), (3, 4), (4, 1)]


@pytest.fixture(params=["segments", "dense"])
def attention_path(request, monkeypatch) -> str:
    """Packed rows with segment-by-segment attention (no mask; the CPU default) or a dense 4D mask."""
    monkeypatch.setenv(SEGMENTS_ENV, "1" if request.param == "segments" else "0")
    return request.param


def _model(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.config._attn_implementation = attn
    return model


def _examples(seed: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    return [{"prompt_ids": ids(p), "completion_ids": ids(c), "row_id": i} for i, (p, c) in enumerate(SHAPES)]


def _run(model: torch.nn.Module, batch: dict, weights: torch.Tensor):
    out = chunked_completion_logprobs(*decoder_and_head(model), batch, token_level=True)
    model.zero_grad(set_to_none=True)
    (out.logps * weights).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("width", [True, 24])
def test_packed_rows_give_each_sequences_unpacked_logprobs_and_gradients(attn, width, attention_path):
    model = _model(attn)
    examples = _examples()
    rows = collate(examples, "sft", PAD)
    packed_batch = collate(examples, "sft", PAD, packing=width)
    packed = pack_sequences(packed_batch, decoder_and_head(model)[0])
    assert packed is not None and packed.input_ids.shape[0] < len(SHAPES)  # fewer rows than sequences
    assert (packed.attention_mask is None) == (packed.segments is not None) == (attention_path == "segments")
    weights = torch.linspace(-2.0, 3.0, len(SHAPES))
    expected, expected_grads = _run(model, rows, weights)
    got, got_grads = _run(model, packed_batch, weights)
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.token_logps, expected.token_logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.num_tokens, expected.num_tokens) and torch.equal(got.mask, expected.mask)
    assert set(got_grads) == set(expected_grads) and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_sequence_is_unchanged_when_its_neighbour_in_the_pack_changes(attn, attention_path):
    model = _model(attn).eval()
    parts = decoder_and_head(model)
    examples = _examples()
    before_batch = collate(examples, "sft", PAD, packing=64)
    packed = pack_sequences(before_batch, parts[0])
    assert packed is not None and packed.input_ids.shape[0] == 1  # every sequence shares one row
    before = chunked_completion_logprobs(*parts, before_batch)
    examples[1]["completion_ids"] = [(t * 7 + 1) % VOCAB for t in examples[1]["completion_ids"]]
    after = chunked_completion_logprobs(*parts, collate(examples, "sft", PAD, packing=64))
    assert not torch.allclose(before.logps[1], after.logps[1])
    others = [0, 2, 3, 4, 5]
    torch.testing.assert_close(before.logps[others], after.logps[others], atol=1e-6, rtol=0)


def test_position_ids_restart_for_every_sequence_and_padding_is_counted(attention_path):
    model = _model()
    batch = collate(_examples(), "sft", PAD, packing=True)
    packed = pack_sequences(batch, decoder_and_head(model)[0])
    lengths = [p + c for p, c in SHAPES]
    starts = (packed.position_ids == 0) & (packed.input_ids != 0)
    assert int(starts.sum()) == len(SHAPES)  # one restart per sequence
    if attention_path == "dense":
        assert packed.input_ids.shape[1] == max(lengths)  # 'true': as wide as the longest sequence
    else:
        # attention costs per sequence, whatever the row's width: one row, no padding, no mask
        assert packed.input_ids.shape == (1, sum(lengths)) and packed.attention_mask is None
        assert packed.segments.rows == ((0, tuple(lengths)),)  # in row order
    real, positions = forward_layout(model, batch)
    assert real == sum(lengths) and positions == packed.input_ids.numel()
    assert positions < batch["input_ids"].numel()  # less padding than one row per sequence


def test_flash_attention_gets_one_row_without_a_mask():
    """The varlen layout (its kernel needs a GPU; here only the tensors it is given are checked)."""
    model = _model()
    model.config._attn_implementation = "flash_attention_2"
    examples = _examples()
    packed = pack_sequences(collate(examples, "sft", PAD, packing=True), decoder_and_head(model)[0])
    assert packed.attention_mask is None and packed.input_ids.shape[0] == 1
    expected_ids = [t for e in examples for t in e["prompt_ids"] + e["completion_ids"]]
    assert sorted(packed.input_ids[0].tolist()) == sorted(expected_ids)  # every token once, no padding
    assert sorted(packed.position_ids[0].tolist()) == sorted(i for p, c in SHAPES for i in range(p + c))


def test_first_fit_decreasing_respects_the_width_and_keeps_long_sequences_whole():
    lengths = [9, 3, 7, 2, 12, 1]
    pack = first_fit_decreasing(lengths, 10)
    fill: dict[int, int] = {}
    for p, n in zip(pack, lengths, strict=True):
        fill[p] = fill.get(p, 0) + n
    assert fill[pack[4]] == 12  # longer than the width: a row of its own
    assert all(total <= 10 for p, total in fill.items() if p != pack[4])
    assert len(fill) == 4 and pack == first_fit_decreasing(lengths, 10)


def test_sft_training_with_packing_logs_less_padding(make_config):
    from .conftest import sft_rows

    def padding(packing):
        config = make_config("sft", rows=sft_rows(8), steps=2)
        config["stages"][0]["data"]["packing"] = packing
        config["stages"][0]["train"]["group_by_length"] = False
        config["output_dir"] += f"-{packing}"
        result = aligner.train(config)
        records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        return [r["padding_fraction"] for r in steps], [r["loss"] for r in steps]

    unpacked, unpacked_loss = padding(False)
    packed, packed_loss = padding(96)
    assert sum(packed) < sum(unpacked)
    assert packed_loss == pytest.approx(unpacked_loss, abs=1e-4)  # same maths, other layout


@pytest.mark.parametrize("stage,message", [
    ({"losses": [{"name": "dpo"}]}, "'stages[0].data.packing' packs sft rows only"),
    ({"data": {"packing": 1}}, "stages[0].data.packing"),
])
def test_packing_is_refused_where_it_cannot_apply(make_config, tmp_path, capsys, stage, message):
    config = make_config("dpo" if "losses" in stage else "sft")
    config["stages"][0]["data"]["packing"] = True
    config["stages"][0]["data"].update(stage.get("data", {}))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("aligner: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything trained or stayed written


def test_packing_benchmark_quick_run(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(root / "bench" / "sft_packing.py"), "--quick", "--rounds", "1",
                             "--json", str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    cases = json.loads(out.read_text())["cases"]
    assert {"unpacked, random order", "packed (true)"} <= set(cases)
    # same rows, same order, same starting weights: the packed layout trains the same losses
    assert cases["packed (true)"]["warmup_mean_loss"] == pytest.approx(
        cases["unpacked, random order"]["warmup_mean_loss"], abs=1e-5)
