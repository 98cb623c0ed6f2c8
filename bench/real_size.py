"""A Qwen2.5-0.5B-shaped model with LoRA: aligner vs TRL for DPO and SFT, switches on and off.

Run:  OMP_NUM_THREADS=1 python bench/real_size.py              (the full benchmark: 40-60 minutes on 2 CPU cores)
      OMP_NUM_THREADS=1 python bench/real_size.py --quick      (a tiny smoke run, under a minute; ratios mean nothing)
      OMP_NUM_THREADS=1 python bench/real_size.py --skip-long  (leave out the long-context part)

The model has the shape of Qwen2.5-0.5B (``Qwen2Config``: hidden 896, 24 layers, 14 heads, 2 key/value
heads, MLP 4,864, vocabulary 151,936, tied embeddings; 494M parameters), with random weights built
from that config and saved once with ``save_pretrained`` (nothing is downloaded); every case loads
it in float32 with sdpa attention and trains LoRA adapters (r 16, alpha 32, dropout 0, all linear
layers) with AdamW (lr 1e-4, constant, clipping 1.0), one torch thread.

Cases, each in a fresh subprocess (so that its peak RSS, ``ru_maxrss``, is its own), run in
interleaved rounds (every case once per round, the order rotated each round):

  DPO (beta 0.1, one pair per step, prompt 32 + completion 64 tokens per sequence)
    aligner, gradient checkpointing off / on     (reference ``auto`` -> cached: one reference pass
                                                  before the first step, inside the total time)
    TRL DPOTrainer, gradient_checkpointing off / on (LoRA: its reference is the model with adapters
                                                  disabled, a reference forward every step)
  SFT (rows of varied length, 16-128 tokens, the prompt an eighth; 4 rows per step; loss on the
       completion tokens)
    aligner, data.packing off / on               (same batches, padded rows or one packed row)
    TRL SFTTrainer: default (padded rows), padding_free=True (the batch as one row), packing=True
                    (best-fit decreasing into rows of max_length 256, 4 such rows per step; its
                    tokens are counted as they are trained, since its steps need not cover one epoch)

  Long context (DPO, gradient checkpointing on for both; ``--long-layers``, default 2, of the same
  width: the full 24 layers at 4,096 tokens take many minutes per step on one CPU thread): one pair
  per step whose sequences are each L tokens (prompt L/2, completion L/2), L in 2,048 and 4,096;
  one training step per case (a step is minutes long: its time is the measure).

Both sides train on the same token ids: the rows are tokenized once by aligner's pipeline (the
built-in tokenizer, the ``plain`` template) in this process; aligner's children re-tokenize the same
text (same ids), TRL's children are given the ids. Measured per case: seconds per step (the median
of the step-to-step times after the first step), wall and process CPU seconds (CPU seconds move
much less than wall time when other processes compete for the cores), tokens per second for SFT (all real tokens of the
run over the time from the start of training to the last step), the total time from before the model
loads to the last step (includes loading, aligner's tokenization and reference pass, TRL's trainer
setup), and memory: the peak resident memory of the process up to the end of the last step
(``VmHWM``, which ``ru_maxrss`` reports; everything: Python, torch, the weights, loading,
activations, logits; not aligner's LoRA merge and final save after the last step, which TRL's cases
here do not do), and the peak while training (the kernel's peak-RSS mark is reset when training
starts: after aligner's reference pass, after TRL's trainer setup) with the RSS at that moment. Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
tensors go back to the OS, as in ``bench/dpo_vs_trl.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dpo_vs_trl import WORDS, machine  # noqa: E402  (also sets HF offline / quiet environment variables)

QWEN = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936)
LORA = dict(r=16, alpha=32)
BETA, LR = 0.1, 1e-4

PRESETS = {
    "full": dict(model=QWEN, rounds=2, dpo=dict(steps=3, prompt=32, length=96),
                 sft=dict(steps=3, batch=4, lengths=(16, 128), pack_width=256),
                 long=dict(layers=2, lengths=(2048, 4096), steps=1)),
    "quick": dict(model=dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=32_000), rounds=1,
                  dpo=dict(steps=2, prompt=8, length=24), sft=dict(steps=2, batch=2, lengths=(8, 24), pack_width=48),
                  long=dict(layers=1, lengths=(128,), steps=2)),
}


# ----------------------------------------------------------------------------------------------
# setup in the parent: model directories and tokenized rows
def save_model(directory: Path, shape: dict[str, int], layers: int) -> Path:
    """Random weights from a Qwen2 config (seed 0), saved once; every case loads these exact weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    config = Qwen2Config(hidden_size=shape["hidden"], num_hidden_layers=layers, num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
                         vocab_size=shape["vocab"], tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def tokenize(rows: list[dict[str, Any]], data_format: str, max_length: int, max_prompt_length: int) -> list[dict]:
    """aligner's own tokenization of ``rows`` (what its children will compute from the same text)."""
    from aligner.data.sources import Row
    from aligner.data.templates import load_template
    from aligner.data.tokenize import tokenize_rows
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    data = tokenize_rows([Row(r, f"row {i}") for i, r in enumerate(rows)], data_format, tok,
                         load_template("plain", tok, chat_data=False), max_length, max_prompt_length, cache=False)
    assert len(data.examples) == len(rows), data.dropped
    return list(data.examples)


def preference_rows(count: int, prompt: int, length: int, seed: int) -> tuple[list[dict], list[dict], int, int]:
    """Pairs whose sequences are exactly ``length`` tokens (prompt ``prompt``): text longer than that,
    truncated by aligner's ``max_prompt_length``/``max_length``. Returns rows, examples and the limits."""
    rng = random.Random(seed)
    rows = [{"prompt": _words(rng, prompt * 2), "chosen": _words(rng, length * 2),
             "rejected": _words(rng, length * 2)} for _ in range(count)]
    examples = tokenize(rows, "preference", length, prompt)
    for e in examples:
        assert len(e["prompt_ids"]) == prompt and len(e["chosen_ids"]) == len(e["rejected_ids"]) == length - prompt, \
            (len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"]))
    return rows, examples, length, prompt


def sft_rows(count: int, lengths: tuple[int, int], seed: int) -> tuple[list[dict], list[dict], int, int]:
    """SFT rows of about ``lengths[0]``-``lengths[1]`` tokens (word counts uniform; the builtin tokenizer
    gives about one token per word here), the prompt an eighth of each; nothing is truncated."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        total = rng.randint(*lengths)
        prompt = max(1, total // 8)
        rows.append({"prompt": _words(rng, prompt), "completion": _words(rng, total - prompt)})
    max_length = 4 * lengths[1]
    return rows, tokenize(rows, "sft", max_length, max_length // 2), max_length, max_length // 2


# ----------------------------------------------------------------------------------------------
# the children
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class StepClock:
    """Timestamps of training start and of every step end, the logged losses, and the RSS at training
    start, after which the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), so that the
    training peak excludes model loading (and, for aligner, its reference pass before the first step)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.steps: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds at the same moments (less sensitive to busy neighbours)
        self.losses: list[float] = []
        self.tokens = 0  # real tokens trained on, where counted (TRL's SFT: its packing changes the rows)
        self.start_mib = self.load_peak_mib = 0.0

    def training_starts(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.start_mib = _status_kib("VmRSS") / 1024
        self.load_peak_mib = _status_kib("VmHWM") / 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (and ru_maxrss's source) to the current RSS

    def step_end(self) -> None:
        self.steps.append(time.perf_counter())
        self.cpu.append(time.process_time())
        # the peak since training started, up to the end of this step (not what follows the last step:
        # aligner then merges LoRA and writes the final model, which the TRL cases here do not do)
        self.train_peak_mib = _status_kib("VmHWM") / 1024

    def summary(self) -> dict[str, Any]:
        """Seconds per step: the median step after the first (the first alone when there is one)."""
        diffs = [b - a for a, b in zip(self.steps, self.steps[1:], strict=False)] or [self.steps[0] - self.start]
        cpu = [b - a for a, b in zip(self.cpu, self.cpu[1:], strict=False)] or [self.cpu[0] - self.cpu_start]
        return {"s_per_step": statistics.median(diffs), "cpu_s_per_step": statistics.median(cpu), "step_times": diffs,
                "train_s": self.steps[-1] - self.start, "train_cpu_s": self.cpu[-1] - self.cpu_start,
                "losses": self.losses, "tokens": self.tokens}


def run_aligner(spec: dict[str, Any], clock: StepClock) -> None:
    from aligner import train
    from aligner.hookspecs import hookimpl
    from aligner.plugins import temporary_plugin

    class Hooks:
        @hookimpl
        def on_run_start(self, run):
            clock.training_starts()

        @hookimpl
        def on_step_end(self, run, step, metrics):
            clock.step_end()
            clock.losses.append(float(metrics["loss"]))

    dpo = spec["kind"] == "dpo"
    config = {
        "output_dir": str(Path(spec["tmp"]) / f"out-{os.getpid()}"), "seed": 0, "threads": 1,
        "model": {"path": spec["model_dir"], "dtype": "float32", "attn_implementation": "sdpa"},
        "tokenizer": "builtin",
        "stages": [{
            "name": spec["kind"],
            "data": {"train": spec["rows"], "template": "plain", "max_length": spec["max_length"],
                     "max_prompt_length": spec["max_prompt_length"], **({} if dpo else {"packing": spec["packing"]})},
            "losses": [{"name": "dpo", "beta": BETA}] if dpo else [{"name": "sft"}],
            "peft": {"name": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"},
            "train": {"max_steps": spec["steps"], "batch_size": spec["batch"], "learning_rate": LR,
                      "lr_scheduler": "constant", "max_grad_norm": 1.0,
                      "gradient_checkpointing": spec["gradient_checkpointing"],
                      **({"share_prompt": spec["share_prompt"]} if "share_prompt" in spec else {})},
            "eval": {"at_start": False},
        }],
    }
    with temporary_plugin(Hooks(), name=f"real-size-{os.getpid()}"):
        train(config)


def run_trl(spec: dict[str, Any], clock: StepClock) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    class Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.training_starts()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    examples = json.loads(Path(spec["examples"]).read_text())
    common = dict(output_dir=str(Path(spec["tmp"]) / f"trl-{os.getpid()}"), max_steps=spec["steps"],
                  per_device_train_batch_size=spec["batch"], learning_rate=LR, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
                  gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    tokenizer = load_builtin_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    if spec["kind"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset  # already tokenized by aligner: the same token ids on both sides

        dataset = Dataset.from_list([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples])
        args = DPOConfig(**common, beta=BETA, max_length=None)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[Steps()])
    else:
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list([{"input_ids": e["prompt_ids"] + e["completion_ids"],
                                      "completion_mask": [0] * len(e["prompt_ids"]) + [1] * len(e["completion_ids"])}
                                     for e in examples])
        packing = spec["trl_layout"] == "packing"
        args = SFTConfig(**common, max_length=spec["pack_width"] if packing else None, packing=packing,
                         padding_free=spec["trl_layout"] == "padding_free", completion_only_loss=True)
        class Counting(SFTTrainer):
            def training_step(self, model, inputs, *args, **kwargs):
                mask = inputs.get("attention_mask")
                clock.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
                return super().training_step(model, inputs, *args, **kwargs)

        trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           peft_config=peft_config, callbacks=[Steps()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    clock = StepClock()
    started = time.perf_counter()
    (run_aligner if spec["side"] == "aligner" else run_trl)(spec, clock)
    out = clock.summary()
    out["total_s"] = clock.steps[-1] - started
    out["steps"] = len(clock.steps)
    # the process's peak: before training (loading; aligner's reference pass) or during it
    out["train_peak_mib"] = clock.train_peak_mib
    out["with_final_save_mib"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, clock.load_peak_mib)
    out["peak_mib"] = max(out["train_peak_mib"], clock.load_peak_mib)
    out["start_mib"], out["setup_peak_mib"] = clock.start_mib, clock.load_peak_mib
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "ALIGNER_CACHE_DIR": str(Path(spec["tmp"]) / f"cache-{time.time_ns()}")}  # a cold reference cache
    for attempt in (1, 2, 3):
        if attempt > 1:
            time.sleep(30)
        result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                text=True, check=False, env=env)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode == 0 and lines:
            return json.loads(lines[-1][len("RESULT "):])
        # On a shared machine a child can fail to start (a library that cannot be mapped while memory is
        # short for a moment): two more tries, half a minute apart, then the error.
        print(f"  case {spec['name']} failed (attempt {attempt}): {result.stderr.strip()[-300:]}", flush=True)
    raise RuntimeError(f"case {spec['name']} failed:\n{result.stderr[-4000:]}")


# ----------------------------------------------------------------------------------------------
# the cases
def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def main_cases(preset: dict[str, Any], tmp: Path, quick: bool) -> list[dict[str, Any]]:
    """The DPO and SFT cases on the full-depth model (each a child spec)."""
    model_dir = str(save_model(tmp / "model", preset["model"], preset["model"]["layers"]))
    d, s = preset["dpo"], preset["sft"]
    rows, examples, max_length, max_prompt = preference_rows(d["steps"], d["prompt"], d["length"], seed=1)
    dpo = dict(kind="dpo", model_dir=model_dir, tmp=str(tmp), steps=d["steps"], batch=1,
               rows=write_jsonl(tmp / "dpo.jsonl", rows), examples=str(tmp / "dpo-ids.json"),
               max_length=max_length, max_prompt_length=max_prompt,
               tokens_per_step=sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                   for e in examples) / len(examples))
    (tmp / "dpo-ids.json").write_text(json.dumps(examples))
    srows, sexamples, smax, sprompt = sft_rows(s["steps"] * s["batch"], s["lengths"], seed=2)
    (tmp / "sft-ids.json").write_text(json.dumps(sexamples))
    sft = dict(kind="sft", model_dir=model_dir, tmp=str(tmp), steps=s["steps"], batch=s["batch"],
               rows=write_jsonl(tmp / "sft.jsonl", srows), examples=str(tmp / "sft-ids.json"),
               max_length=smax, max_prompt_length=sprompt, pack_width=s["pack_width"], gradient_checkpointing=False,
               tokens=sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in sexamples))
    cases = []
    for gc in (False, True):
        on = "on" if gc else "off"
        cases.append({**dpo, "side": "aligner", "gradient_checkpointing": gc, "name": f"DPO aligner, checkpointing {on}"})
        cases.append({**dpo, "side": "trl", "gradient_checkpointing": gc, "name": f"DPO TRL, checkpointing {on}"})
    cases += [{**sft, "side": "aligner", "packing": False, "name": "SFT aligner, packing off"},
              {**sft, "side": "aligner", "packing": True, "name": "SFT aligner, packing on"},
              {**sft, "side": "trl", "trl_layout": "padded", "name": "SFT TRL, default (padded)"},
              {**sft, "side": "trl", "trl_layout": "padding_free", "name": "SFT TRL, padding_free"},
              {**sft, "side": "trl", "trl_layout": "packing", "name": "SFT TRL, packing"}]
    if quick:  # the switched-on cases only
        cases = [c for c in cases if c.get("gradient_checkpointing") and c["kind"] == "dpo"
                 or c["name"] in ("SFT aligner, packing on", "SFT TRL, padding_free")]
    return cases


def long_cases(preset: dict[str, Any], tmp: Path, extra: bool = False) -> list[dict[str, Any]]:
    """aligner and TRL at each length; with ``extra``, also aligner with checkpointing off and with
    ``share_prompt: false`` (two rows per pair, no 4D mask): where aligner's memory goes."""
    long = preset["long"]
    model_dir = str(save_model(tmp / "model-long", preset["model"], long["layers"]))
    cases = []
    for length in long["lengths"]:
        rows, examples, max_length, max_prompt = preference_rows(long["steps"], length // 2, length, seed=3)
        (tmp / f"long-{length}.json").write_text(json.dumps(examples))
        base = dict(kind="dpo", model_dir=model_dir, tmp=str(tmp), steps=long["steps"], batch=1,
                    rows=write_jsonl(tmp / f"long-{length}.jsonl", rows), examples=str(tmp / f"long-{length}.json"),
                    max_length=max_length, max_prompt_length=max_prompt, gradient_checkpointing=True, length=length,
                    tokens_per_step=4 * length)
        cases.append({**base, "side": "aligner", "name": f"long DPO {length} aligner"})
        cases.append({**base, "side": "trl", "name": f"long DPO {length} TRL"})
        if extra:
            cases.append({**base, "side": "aligner", "gradient_checkpointing": False,
                          "name": f"long DPO {length} aligner, checkpointing off"})
            cases.append({**base, "side": "aligner", "share_prompt": False,
                          "name": f"long DPO {length} aligner, share_prompt off"})
    return cases


def run_rounds(cases: list[dict[str, Any]], rounds: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in cases}
    for r in range(rounds):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            out = run_child(case)
            results[case["name"]].append(out)
            print(f"  round {r + 1}: {case['name']}: {out['s_per_step']:.2f} s/step ({out['cpu_s_per_step']:.2f} CPU), peak {out['peak_mib']:.0f} MiB "
                  f"(training {out['train_peak_mib']:.0f}, at its start {out['start_mib']:.0f}), total "
                  f"{out['total_s']:.1f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
    return results


def med(outs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(o[key] for o in outs)


def report(cases: list[dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for case in cases:
        outs = results[case["name"]]
        row = {"s_per_step": med(outs, "s_per_step"), "cpu_s_per_step": med(outs, "cpu_s_per_step"), "peak_mib": max(o["peak_mib"] for o in outs),
               "train_peak_mib": max(o["train_peak_mib"] for o in outs), "start_mib": med(outs, "start_mib"),
               "total_s": med(outs, "total_s"), "rounds": outs}
        if case["kind"] == "sft":
            # aligner trains one epoch (every row once) in these steps; TRL's counted tokens are used where
            # counted (its packing forms its own rows, so its steps need not cover one epoch exactly)
            row["tokens_per_s"] = statistics.median((o["tokens"] or case["tokens"]) / o["train_s"] for o in outs)
            row["tokens_per_cpu_s"] = statistics.median((o["tokens"] or case["tokens"]) / o["train_cpu_s"]
                                                        for o in outs)
        table[case["name"]] = row
    return table


def print_table(title: str, table: dict[str, Any], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    print(f"\n{title}")
    print(f"{'case':46s} {'s/step':>8s} {'CPU s':>7s} {'tokens/s':>9s} {'peak MiB':>9s} {'training':>9s} {'at start':>9s} "
          f"{'total s':>8s}")
    for name, row in table.items():
        tps = f"{row['tokens_per_s']:9.1f}" if "tokens_per_s" in row else f"{'':9s}"
        print(f"{name:46s} {row['s_per_step']:8.2f} {row['cpu_s_per_step']:7.2f} {tps} {row['peak_mib']:9.0f} {row['train_peak_mib']:9.0f} "
              f"{row['start_mib']:9.0f} {row['total_s']:8.1f}")
    ratios = []
    for a, t in pairs:
        if a not in table or t not in table:
            continue
        ra, rt = table[a], table[t]
        ratio = {"aligner": a, "trl": t, "time_ratio": ra["s_per_step"] / rt["s_per_step"],
                 "cpu_time_ratio": ra["cpu_s_per_step"] / rt["cpu_s_per_step"],
                 "memory_ratio": ra["peak_mib"] / rt["peak_mib"],
                 "training_memory_ratio": ra["train_peak_mib"] / rt["train_peak_mib"]}
        if "tokens_per_s" in ra:
            ratio["throughput_ratio"] = ra["tokens_per_s"] / rt["tokens_per_s"]
            ratio["cpu_throughput_ratio"] = ra["tokens_per_cpu_s"] / rt["tokens_per_cpu_s"]
        ratios.append(ratio)
        extra = (f", tokens/s {ratio['throughput_ratio']:.2f}x (per CPU s {ratio['cpu_throughput_ratio']:.2f}x)"
                 if "throughput_ratio" in ratio else "")
        print(f"ratio aligner/TRL  {a}  vs  {t}: time per step {ratio['time_ratio']:.2f}x "
              f"(CPU {ratio['cpu_time_ratio']:.2f}x), "
              f"peak memory {ratio['memory_ratio']:.2f}x (training {ratio['training_memory_ratio']:.2f}x){extra}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and few cases: a smoke run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the DPO/SFT cases (default 2, quick 1)")
    parser.add_argument("--long-rounds", type=int, default=1, help="rounds of the long-context cases")
    parser.add_argument("--long-layers", type=int, help="layers of the long-context model (default 2)")
    parser.add_argument("--skip-long", action="store_true", help="leave out the long-context part")
    parser.add_argument("--long-extra", action="store_true",
                        help="long context: also aligner with checkpointing off and with share_prompt off")
    parser.add_argument("--skip-main", action="store_true", help="only the long-context part")
    parser.add_argument("--long-lengths", type=int, nargs="+", help="long-context lengths (default 2048 4096)")
    parser.add_argument("--only", help="run only the cases whose name matches this regular expression")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    import torch

    torch.set_num_threads(1)
    preset = PRESETS["quick" if args.quick else "full"]
    if args.long_layers:
        preset = {**preset, "long": {**preset["long"], "layers": args.long_layers}}
    if args.long_lengths:
        preset = {**preset, "long": {**preset["long"], "lengths": tuple(args.long_lengths)}}

    def chosen(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c for c in cases if re.search(args.only, c["name"])] if args.only else cases

    rounds = args.rounds or preset["rounds"]
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), load average {info['loadavg']}, torch {info['torch']}, "
          f"transformers {info['transformers']}, trl {info['trl']}; 1 torch thread per case", flush=True)
    results: dict[str, Any] = {"machine": info, "preset": preset, "rounds": rounds}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aligner-real-size-") as name:
        tmp = Path(name)
        if not args.skip_main:
            cases = chosen(main_cases(preset, tmp, args.quick))
            print(f"model: Qwen2 shape {preset['model']}, LoRA r {LORA['r']}; {len(cases)} cases x {rounds} rounds",
                  flush=True)
            table = report(cases, run_rounds(cases, rounds))
            results["main"] = table
            results["main_ratios"] = print_table(
                f"DPO and SFT, {preset['model']['layers']} layers (medians of {rounds} rounds; peak: the largest)",
                table, [("DPO aligner, checkpointing off", "DPO TRL, checkpointing off"),
                        ("DPO aligner, checkpointing on", "DPO TRL, checkpointing on"),
                        ("SFT aligner, packing off", "SFT TRL, default (padded)"),
                        ("SFT aligner, packing on", "SFT TRL, padding_free"),
                        ("SFT aligner, packing on", "SFT TRL, packing")])
            if {"SFT aligner, packing off", "SFT aligner, packing on"} <= table.keys():
                gain = table["SFT aligner, packing on"]["tokens_per_s"] / table["SFT aligner, packing off"]["tokens_per_s"]
                results["packing_gain"] = gain
                print(f"aligner SFT packing on / off: {gain:.2f}x tokens/s")
        if not args.skip_long:
            cases = chosen(long_cases(preset, tmp, args.long_extra))
            print(f"\nlong context: {preset['long']['layers']} layers, gradient checkpointing on; {len(cases)} cases",
                  flush=True)
            table = report(cases, run_rounds(cases, args.long_rounds))
            results["long"] = table
            lengths = preset["long"]["lengths"]
            results["long_ratios"] = print_table(
                f"long-context DPO, {preset['long']['layers']} layers, gradient checkpointing on", table,
                [(f"long DPO {n} aligner", f"long DPO {n} TRL") for n in lengths])
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\nwall time {results['wall_s']:.0f} s; load average at the end {results['machine']['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
