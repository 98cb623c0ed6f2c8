"""Memory of each built-in optimizer on the same model: peak RSS of the training process and the size
of the optimizer state it checkpoints.

    OMP_NUM_THREADS=1 python bench/optimizer_memory.py            # the table in docs/optimizers.md
    OMP_NUM_THREADS=1 python bench/optimizer_memory.py --hidden 256 --layers 2   # a quick look

Each optimizer trains in a fresh process (peak RSS is a per-process high-water mark, so runs in one
process would hide each other): a few SFT steps of a tiny-spec Llama built from a config (no
download), on the quickstart data. ``adamw`` and ``adamw_8bit`` train every weight; ``lora_plus``
and ``lora_fa`` train LoRA adapters (r=8, all linear layers) of the same model, with ``adamw`` on the
same adapters as their baseline. The state size is the sum of the tensors in the last checkpoint's
``optimizer.pt``, the optimizer's own memory without the noise of the allocator.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (label, optimizer choice, peft choice)
CASES = [
    ("adamw (full)", {"name": "adamw"}, {"name": "full"}),
    ("adamw_8bit (full)", {"name": "adamw_8bit"}, {"name": "full"}),
    ("adamw (LoRA r=8)", {"name": "adamw"}, {"name": "lora", "r": 8}),
    ("lora_plus (LoRA r=8)", {"name": "lora_plus"}, {"name": "lora", "r": 8}),
    ("lora_fa (LoRA r=8)", {"name": "lora_fa"}, {"name": "lora", "r": 8}),
]


def _tensor_bytes(value: object) -> int:
    """Bytes of every tensor inside a (nested) state dict."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def child(args: argparse.Namespace) -> None:
    """Train one case and print its measurements as JSON."""
    with tempfile.TemporaryDirectory(prefix="aligner-optimizer-memory-") as out:  # checkpoints are large
        measured = _train_and_measure(args, Path(out))
    print(json.dumps(measured))


def _train_and_measure(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Peak RSS and checkpointed optimizer-state size of one case, trained under ``out``."""
    import torch

    import aligner

    _, optimizer, peft = CASES[args.case]
    config = {
        "output_dir": str(out / "run"), "seed": 0, "tokenizer": "builtin",
        "model": {"tiny": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": 8,
                           "intermediate_size": args.hidden * 11 // 4}},
        "stages": [{"name": "sft", "data": {"train": str(ROOT / "aligner/quickstart/data/sft_train.jsonl"),
                                           "template": "plain", "max_length": 64, "max_prompt_length": 32},
                    "losses": [{"name": "sft"}], "peft": peft, "optimizer": optimizer,
                    "eval": {"at_start": False},
                    "train": {"max_steps": args.steps, "batch_size": 4, "save_every": args.steps,
                              "learning_rate": 1e-4}}],
    }
    result = aligner.train(config)
    saved = torch.load(result.output_dir / "sft" / "checkpoints" / f"step-{args.steps}" / "optimizer.pt",
                       weights_only=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_mib": peak_kib / 1024, "state_mib": _tensor_bytes(saved["optimizer"]["state"]) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        child(args)
        return
    print(f"tiny Llama, hidden {args.hidden}, {args.layers} layers, {args.steps} SFT steps of batch 4\n")
    print("| optimizer | peak RSS (MiB) | optimizer state (MiB) |\n|---|---|---|")
    for index, (label, _, _) in enumerate(CASES):
        done = subprocess.run([sys.executable, __file__, "--case", str(index), "--hidden", str(args.hidden),
                               "--layers", str(args.layers), "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {label} | {measured['peak_rss_mib']:.0f} | {measured['state_mib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
