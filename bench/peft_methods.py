"""Trainable parameters, peak memory and step time of every PEFT method on the same model.

    OMP_NUM_THREADS=1 python bench/peft_methods.py                 # the table in docs/reference_and_peft.md
    OMP_NUM_THREADS=1 python bench/peft_methods.py --quick --methods lora,bitfit   # a quick look

Each method trains a few DPO steps in a fresh process (peak RSS is a per-process high-water mark, so
runs in one process would hide each other) on a tiny-spec Llama built from a config (no download) and
the quickstart preference data. Every method uses the ``cached`` reference, which works with all of
them and keeps no second model in memory, so the differences are the methods' own. BitFit needs
biases, which the tiny Llama lacks: it runs on the same architecture with q/k/v/o and MLP biases
(``attention_bias``/``mlp_bias``), saved once to a temporary directory and loaded by path.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aligner import hookimpl

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# label -> peft choice for the bench model (hidden size a multiple of 32, at least 2 layers)
METHODS: dict[str, dict] = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 16},
    "qlora": {"name": "qlora", "r": 16},
    "dora": {"name": "dora", "r": 16},
    "adalora": {"name": "peft", "method": "adalora", "init_r": 16, "target_r": 8, "tinit": 5, "tfinal": 2,
                "total_step": 10, "target_modules": LINEAR},
    "oft": {"name": "peft", "method": "oft", "target_modules": LINEAR, "oft_block_size": 32, "r": 0},
    "ia3": {"name": "peft", "method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
    "lokr": {"name": "peft", "method": "lokr", "r": 16, "target_modules": LINEAR},
    "loha": {"name": "peft", "method": "loha", "r": 16, "target_modules": LINEAR},
    "adaption_prompt": {"name": "peft", "method": "adaption_prompt", "adapter_len": 16, "adapter_layers": 2},
    "ln_tuning": {"name": "peft", "method": "ln_tuning"},
    "prompt_tuning": {"name": "peft", "method": "prompt_tuning", "num_virtual_tokens": 16},
    "p_tuning": {"name": "peft", "method": "p_tuning", "num_virtual_tokens": 16, "encoder_hidden_size": 128},
    "prefix_tuning": {"name": "peft", "method": "prefix_tuning", "num_virtual_tokens": 16},
    "bitfit": {"name": "bitfit"},
}


def _weights(parameter: object) -> int:
    """Weights a parameter stands for: a 4-bit parameter stores two per byte, its shape says how many."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        count = 1
        for size in quant_state.shape:
            count *= size
        return count
    return parameter.numel()


class _Measure:
    """Counts trainable and frozen weights at the start, and times each step."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.trainable = self.frozen = 0

    @hookimpl
    def on_run_start(self, run) -> None:
        model = run.accelerator.unwrap_model(run.model)
        for parameter in model.parameters():
            if parameter.requires_grad:
                self.trainable += parameter.numel()
            else:
                self.frozen += _weights(parameter)
        self.step_ends.append(time.perf_counter())

    @hookimpl
    def on_step_end(self, run, step, metrics) -> None:
        self.step_ends.append(time.perf_counter())


def _model_spec(args: argparse.Namespace) -> dict:
    return {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": max(1, args.hidden // 128),
            "intermediate_size": args.hidden * 11 // 4}


def save_biased_model(args: argparse.Namespace, path: Path) -> None:
    """The bench's tiny Llama with attention and MLP biases, saved for ``model.path`` (BitFit's model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    spec = _model_spec(args)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec["hidden_size"],
                         intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
                         num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_heads"],
                         attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)


def child(args: argparse.Namespace) -> None:
    """Train one method and print its measurements as JSON."""
    import aligner
    from aligner.plugins import temporary_plugin

    peft = METHODS[args.case]
    model = {"path": args.biased_model} if args.case == "bitfit" else {"tiny": _model_spec(args)}
    measure = _Measure()
    with tempfile.TemporaryDirectory(prefix="aligner-peft-methods-") as out:
        config = {
            "output_dir": str(Path(out) / "run"), "seed": 0, "tokenizer": "builtin", "model": model,
            "stages": [{"name": "dpo", "data": {"train": str(ROOT / "aligner/quickstart/data/preference_train.jsonl"),
                                               "template": "plain", "max_length": 64},
                        "losses": [{"name": "dpo"}], "peft": peft,
                        "reference": {"name": "cached", "dir": str(Path(out) / "cache")},
                        "eval": {"at_start": False},
                        "train": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 1e-4}}],
        }
        with temporary_plugin(measure, name="measure"):
            aligner.train(config)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # The first step also warms up kernels and allocators: time the others.
    later = [b - a for a, b in zip(measure.step_ends[1:], measure.step_ends[2:], strict=False)]
    print(json.dumps({"trainable": measure.trainable, "frozen": measure.frozen, "peak_rss_mib": peak_kib / 1024,
                      "step_s": sum(later) / len(later) if later else None}))


def _run_case(args: argparse.Namespace, method: str, biased_model: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", method, "--hidden", str(args.hidden),
                           "--layers", str(args.layers), "--steps", str(args.steps),
                           "--biased-model", str(biased_model)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure every (or each named) method in its own process and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="a tiny model (hidden 64), 2 steps")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--biased-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.steps = 64, 2
    if args.case is not None:
        child(args)
        return
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    print(f"tiny Llama, hidden {args.hidden}, {args.layers} layers, {args.steps} DPO steps of batch 4, "
          "reference: cached\n")
    print("| method | trainable params | % of the model | peak RSS (MiB) | s/step |\n|---|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory(prefix="aligner-peft-methods-model-") as tmp:
        biased_model = Path(tmp) / "biased"
        if "bitfit" in methods:
            save_biased_model(args, biased_model)
        for method in methods:
            measured = results[method] = _run_case(args, method, biased_model)
            if "error" in measured:
                print(f"| {method} | failed: {measured['error']} | | | |", flush=True)
                continue
            total = measured["trainable"] + measured["frozen"]
            step = f"{measured['step_s']:.2f}" if measured["step_s"] is not None else "-"
            print(f"| {method} | {measured['trainable']:,} | {100 * measured['trainable'] / total:.3f} | "
                  f"{measured['peak_rss_mib']:.0f} | {step} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"spec": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
