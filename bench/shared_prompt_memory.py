"""Peak memory of one long shared-prompt row: dense 4D mask against segment-by-segment attention (CPU).

Run:  OMP_NUM_THREADS=1 python bench/shared_prompt_memory.py            (a 5950-token pair, ~1 minute)
      OMP_NUM_THREADS=1 python bench/shared_prompt_memory.py --quick    (a 600-token pair, seconds)

One preference pair (prompt 3950 tokens, chosen and rejected 1000 each: one packed row of 5950
tokens, ``prompt + chosen + rejected``) runs through aligner's log-prob forward
(``chunked_completion_logprobs``) and backward on a Llama-shaped model (hidden 64, 4 heads, one
layer or ``--layers N``, sdpa attention, random weights), once per layout, each in a fresh process:

  two rows          the pair as two padded rows (no shared prompt; transformers' own causal mask)
  shared, dense     one packed row with a dense [1, 1, 5950, 5950] boolean mask (``ALIGNER_SEGMENT_ATTENTION=0``)
  shared, segments  one packed row, attention segment by segment, no mask (``ALIGNER_SEGMENT_ATTENTION=1``)

Reported: the process's peak resident memory during a second forward and backward (after one
warm-up step), over its resident memory just before (MiB; Linux ``VmHWM`` reset through
``/proc/self/clear_refs``, with glibc returning large blocks on free), and the seconds that step took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"two rows": ("0", False), "shared, dense": ("0", True), "shared, segments": ("1", True)}
SHAPES = {"full": (3950, 1000, 1000), "quick": (400, 100, 100)}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _reset_peak() -> float:
    """Reset the peak resident memory (Linux: ``VmHWM``) to the current one, and return that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def one_case(share: bool, shape: tuple[int, int, int], layers: int) -> dict[str, float]:
    """Run the step in this process; returns peak memory over the pre-step baseline and seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.data.batching import collate
    from aligner.modeling.logprobs import chunked_completion_logprobs, decoder_and_head

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                                         attn_implementation="sdpa"))
    prompt, chosen, rejected = shape
    generator = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 256, (n,), generator=generator).tolist()

    example = {"prompt_ids": ids(prompt), "chosen_ids": ids(chosen), "rejected_ids": ids(rejected), "row_id": 0}
    batch = collate([example], "preference", 0, share_prompt=share)
    parts = decoder_and_head(model)

    def step() -> list[float]:
        model.zero_grad(set_to_none=True)
        out = chunked_completion_logprobs(*parts, batch)
        out.logps.sum().backward()
        return out.logps.tolist()

    step()  # warm-up: one-time allocations (kernels, thread pools) are not the layout's
    model.zero_grad(set_to_none=True)
    baseline = _reset_peak()
    started = time.perf_counter()
    logps = step()
    seconds = time.perf_counter() - started
    return {"peak_over_baseline_mib": _peak_mib() - baseline, "seconds": seconds, "logps": logps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 600-token pair: a smoke run")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args(argv)
    shape = SHAPES["quick" if args.quick else "full"]
    if args.case:
        print(json.dumps(one_case(CASES[args.case][1], shape, args.layers)))
        return 0
    results = {}
    for name, (segments, _) in CASES.items():
        command = [sys.executable, __file__, "--case", name, "--layers", str(args.layers)]
        command += ["--quick"] if args.quick else []
        # Large blocks straight from mmap, returned on free: resident memory follows live tensors.
        env = {**os.environ, "ALIGNER_SEGMENT_ATTENTION": segments, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    width = sum(shape)
    print(f"one pair, prompt {shape[0]} + chosen {shape[1]} + rejected {shape[2]} = {width} tokens in the shared "
          f"row; {args.layers}-layer model; forward + backward")
    print(f"{'case':18s} {'peak MiB':>9s} {'seconds':>8s}")
    for name, result in results.items():
        print(f"{name:18s} {result['peak_over_baseline_mib']:9.1f} {result['seconds']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "layers": args.layers, "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
