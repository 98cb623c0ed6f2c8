"""SFT tokens per second with ``data.packing`` on and off, on rows of varied length (CPU).

Run:  OMP_NUM_THREADS=1 python bench/sft_packing.py            (the full benchmark, a few minutes)
      OMP_NUM_THREADS=1 python bench/sft_packing.py --quick    (a tiny smoke run, seconds)

Every case trains the same Llama-style model (built from a config, random weights, sdpa attention)
from the same initial weights on the same synthetic SFT rows (lengths drawn uniformly from 8 to 256
tokens, the prompt an eighth of each), with the same batch size, AdamW and one epoch per round:
aligner's own collate, batch order (``LengthGroupedBatches``), log-prob forward
(``completion_logprobs``, the chunked path the trainer uses) and the SFT loss's token mean. Only
the layout differs:

  unpacked, random order       one padded row per sequence, batches in random order
                               (``group_by_length: false``; TRL's default layout)
  unpacked, length-grouped     the same, batches of similar lengths (aligner's default)
  packed (true)                random order, each batch packed (``data.packing: true``); on CPU
                               attention runs sequence by sequence without a mask
                               (``aligner.modeling.segment_attention``), so the whole batch is
                               one row with no padding at all
  packed (N), dense mask       random order, packed into rows of N tokens with a block-diagonal
                               dense mask (``data.packing: N``, ``ALIGNER_SEGMENT_ATTENTION=0``)
  packed (true), dense mask    the same into rows as wide as the batch's longest sequence: the
                               layout (and speed) before segment attention

Throughput is real (non-padding) tokens over the wall time of the epoch, forward, backward and
optimizer steps included; also over the process's CPU time (``time.process_time``), which a busy
neighbour on a shared machine disturbs far less than the wall time (with one thread the two agree
on an idle machine). The cases run in interleaved rounds (one epoch of each case per round, so
that a busy neighbour slows every case alike; each round starts at a different case), after one
warm-up round, and the median of the rounds is reported, with each case's ratio to the unpacked random-order one and to the length-grouped one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner.data.batching import LengthGroupedBatches, collate  # noqa: E402
from aligner.modeling.logprobs import completion_logprobs  # noqa: E402
from aligner.modeling.segment_attention import ENV as SEGMENTS_ENV  # noqa: E402
from aligner.optimizers.adamw import fused_kernel_applies  # noqa: E402

PRESETS = {
    # a Llama shape small enough for one CPU thread; rows (= batches x batch size); lengths
    "full": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=2048, rows=96, batch=8, lengths=(8, 256),
                 widths=(512,)),
    "quick": dict(hidden=32, layers=1, heads=2, intermediate=64, vocab=256, rows=8, batch=4, lengths=(8, 32),
                  widths=(64,)),
}


def make_rows(count: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Tokenized SFT examples with total lengths uniform in ``lengths``; the prompt is an eighth of each."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        total = rng.randint(*lengths)
        prompt = max(1, total // 8)
        ids = [rng.randrange(1, vocab) for _ in range(total)]
        rows.append({"prompt_ids": ids[:prompt], "completion_ids": ids[prompt:], "row_id": i})
    return rows


def build_model(preset: dict[str, Any]) -> torch.nn.Module:
    """The benchmark's model, from a fixed seed (every case starts from these weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=preset["vocab"], hidden_size=preset["hidden"], intermediate_size=preset["intermediate"],
                         num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
                         num_key_value_heads=preset["heads"], max_position_embeddings=1024, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def epoch(model: torch.nn.Module, rows: list[dict[str, Any]], batch_size: int, grouped: bool,
          packing: bool | int, seed: int) -> tuple[int, float, float, float]:
    """One epoch of SFT steps: ``(real tokens, seconds, CPU seconds of this process, mean loss)``."""
    parameters = list(model.parameters())
    # the kernel the trainer's adamw picks (fused: auto)
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=fused_kernel_applies(parameters) or None)
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    order = LengthGroupedBatches(lengths, batch_size, seed=seed, group_by_length=grouped)
    tokens, losses = 0, []
    started, cpu_started = time.perf_counter(), time.process_time()
    for indices in order:
        batch = collate([rows[i] for i in indices], "sft", pad_token_id=0, packing=packing)
        out = completion_logprobs(model, batch)
        loss = -out.logps.sum() / out.num_tokens.sum().clamp(min=1)  # the sft loss's token mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += int(batch["attention_mask"].sum())
        losses.append(float(loss.detach()))
    return tokens, time.perf_counter() - started, time.process_time() - cpu_started, statistics.fmean(losses)


def main(argv: list[str] | None = None) -> int:
    """Run the cases in interleaved rounds and print (and optionally write) tokens/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and rows: a smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = make_rows(preset["rows"], preset["lengths"], preset["vocab"])
    cases: dict[str, tuple[bool, bool | int, str]] = {
        "unpacked, random order": (False, False, "auto"),
        "unpacked, length-grouped": (True, False, "auto"),
        "packed (true)": (False, True, "auto"),
        **{f"packed ({w}), dense mask": (False, w, "0") for w in preset["widths"]},
        "packed (true), dense mask": (False, True, "0"),
    }
    initial = build_model(preset).state_dict()
    model = build_model(preset)
    results: dict[str, list[float]] = {name: [] for name in cases}
    cpu_results: dict[str, list[float]] = {name: [] for name in cases}
    first_loss: dict[str, float] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up (first-call overheads) and is not counted
        names = list(cases)
        # Each round starts at a different case, so that none always runs first or last in a round
        # (a neighbour's load changing during a round would otherwise favour one case).
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            grouped, packing, segments = cases[name]
            os.environ[SEGMENTS_ENV] = segments
            model.load_state_dict(initial)
            tokens, seconds, cpu_seconds, loss = epoch(model, rows, preset["batch"], grouped, packing, seed=round_)
            if round_:
                results[name].append(tokens / seconds)
                cpu_results[name].append(tokens / cpu_seconds)
            else:
                first_loss[name] = loss
    base, grouped_base = (statistics.median(results[k]) for k in ("unpacked, random order", "unpacked, length-grouped"))
    cpu_base = statistics.median(cpu_results["unpacked, random order"])
    report = {"threads": torch.get_num_threads(), "preset": preset, "rounds": args.rounds, "cases": {}}
    print(f"SFT on {len(rows)} rows of {preset['lengths'][0]}-{preset['lengths'][1]} tokens, batch {preset['batch']}, "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds} interleaved rounds")
    print(f"{'case':28s} {'tokens/s':>10s} {'vs random':>10s} {'vs grouped':>11s} {'tokens/CPU-s':>13s} "
          f"{'vs random':>10s}")
    for name, values in results.items():
        median, cpu_median = statistics.median(values), statistics.median(cpu_results[name])
        report["cases"][name] = {"tokens_per_second": median, "all": values, "vs_unpacked_random": median / base,
                                 "vs_unpacked_grouped": median / grouped_base, "warmup_mean_loss": first_loss[name],
                                 "tokens_per_cpu_second": cpu_median, "cpu_vs_unpacked_random": cpu_median / cpu_base}
        print(f"{name:28s} {median:10.0f} {median / base:9.2f}x {median / grouped_base:10.2f}x {cpu_median:13.0f} "
              f"{cpu_median / cpu_base:9.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
