"""aligner vs TRL's DPOTrainer on the same DPO work: throughput, peak memory, and the floor.

Run:  python bench/dpo_vs_trl.py            (the full benchmark, a few minutes on 2 CPU cores)
      python bench/dpo_vs_trl.py --quick    (a tiny smoke run, seconds)
      python bench/dpo_vs_trl.py --long-prompts --skip-memory   (long prompts; informational)

Both sides train the same tiny Llama-style model (built from a config and saved to a temporary
directory, which both load), on the same synthetic preference rows tokenized to the same token ids,
with the same batch size, optimizer (AdamW, constant LR, clipping 1.0), beta and number of steps
(one epoch: every row exactly once), in one invocation of this script. Cases:

  (a) aligner's default (reference ``auto`` -> ``cached``, a cold cache: its reference pass counts)
      vs TRL's default (a reference model copy, a reference forward every step);
  (b) the same aligner run vs TRL with ``precompute_ref_log_probs=True`` (its precompute counts),
      fed aligner's batch order, so that per-step losses can be compared;
  (c) a second aligner run on the now warm cache, against the floor;
  (d) a 151,936-token vocabulary: peak memory of aligner's default vs TRL's default, each measured
      in a fresh subprocess.

Throughput is non-padding tokens (chosen and rejected sequences, prompt included) divided by the
wall time from the start of training setup (for aligner: the reference setup, i.e. cache fill; for
TRL: building the reference model and the trainer, which runs its precompute) to the end of the last
optimizer step. Tokenization, model loading of the policy, final saving and evaluation are outside
the window on both sides. The floor is the policy's own forward (the model's standard
``model(...).logits``), a sum of completion log-probs, backward, clipping and an AdamW step, over
the same pairs in batches of the same size, chosen and rejected as two rows each (grouped by length
for that layout): the policy's work in the standard layout every DPO trainer uses.

Peak memory: resident set size (RSS, from /proc/self/statm) sampled every millisecond by a thread,
peak minus the RSS just before the model is loaded, in a fresh process per side. It therefore
counts the policy, the reference (copy or cached table), gradients, optimizer state, activations
and logits of the training run. Both children run with ``MALLOC_MMAP_THRESHOLD_=65536``, so every
tensor over 64 KiB is its own mapping, returned to the OS when freed: RSS then follows live tensor
memory instead of what glibc's heap retains. Sampling can miss a spike shorter than a millisecond.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner.hookspecs import hookimpl  # noqa: E402

WORDS = ("the a an of to in is and it you that was for on are with as his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said each she which "
         "do their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find good kind happy warm gentle bright calm").split()

PRESETS = {
    # hidden, layers, heads, intermediate, vocab, rows (= steps x batch), batch, prompt words, completion words
    "full": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=2048, steps=24, batch=8,
                 prompt=(8, 48), completion=(8, 96)),
    "quick": dict(hidden=32, layers=1, heads=2, intermediate=64, vocab=2048, steps=3, batch=2,
                  prompt=(2, 8), completion=(2, 8)),
}
# --long-prompts: the same model and steps on rows whose prompts are long next to their answers, as in
# multi-turn conversation data (HH-RLHF-like); informational, the targets are read on the default data.
LONG_PROMPTS = dict(prompt=(64, 192), completion=(8, 96))
BIG_VOCAB = 151_936
MEMORY_PRESETS = {
    "full": dict(hidden=128, layers=2, heads=2, intermediate=344, vocab=BIG_VOCAB, steps=4, batch=4,
                 prompt=(8, 48), completion=(8, 96)),
    "quick": dict(hidden=32, layers=1, heads=2, intermediate=64, vocab=8192, steps=2, batch=2,
                  prompt=(2, 8), completion=(2, 8)),
}
BETA, LR = 0.1, 1e-4


# ----------------------------------------------------------------------------------------------
# measurement helpers
class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread every millisecond."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def machine() -> dict[str, Any]:
    """nproc, CPU model, load average, versions."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import transformers
    import trl

    return {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": model,
            "loadavg": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}


# ----------------------------------------------------------------------------------------------
# the shared setup: model, data
def write_rows(path: Path, n: int, prompt: tuple[int, int], completion: tuple[int, int], seed: int) -> Path:
    """Synthetic preference rows: random words, varied lengths, chosen != rejected."""
    rng = random.Random(seed)

    def text(bounds: tuple[int, int]) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*bounds)))

    with open(path, "w") as f:
        for _ in range(n):
            chosen, rejected = text(completion), text(completion)
            while rejected == chosen:
                rejected = text(completion)
            f.write(json.dumps({"prompt": text(prompt), "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def save_model(directory: Path, spec: dict[str, Any], seed: int) -> Path:
    """A random tiny Llama saved with save_pretrained: both trainers load these exact weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["heads"], max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load_policy(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# aligner
class Recorder:
    """Hooks into aligner's loop: setup start, step ends, losses, the tokenized data and batch order."""

    def __init__(self):
        self.t_setup = None
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.padding: list[float] = []
        self.examples: list[dict[str, Any]] = []
        self.order: list[list[int]] = []
        self.reference_passes = None

    @hookimpl
    def on_run_start(self, run):
        from aligner.data.batching import LengthGroupedBatches, stage_lengths

        data = run.stage.train_data
        self.examples = data.examples
        sampler = LengthGroupedBatches(stage_lengths(run.stage, data), run.stage.config.train.batch_size,
                                       seed=run.config.seed + run.stage.index,
                                       group_by_length=run.stage.config.train.group_by_length)
        sampler.set_epoch(0)
        self.order = sampler.batches()
        self.reference_passes = getattr(run.stage.reference, "forward_passes", None)

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.step_times.append(time.perf_counter())
        self.losses.append(float(metrics["loss"]))
        self.padding.append(float(metrics.get("padding_fraction", float("nan"))))


def aligner_config(tmp: Path, model_dir: Path, data: Path, spec: dict[str, Any], name: str,
                   share_prompt: bool = True) -> dict[str, Any]:
    return {
        "output_dir": str(tmp / f"aligner-{name}"), "seed": 0,
        "model": {"path": str(model_dir)}, "tokenizer": "builtin",
        "stages": [{
            "name": "dpo",
            "data": {"train": str(data), "template": "plain", "max_length": 1024, "max_prompt_length": 512},
            "losses": [{"name": "dpo", "beta": BETA}],
            "train": {"max_steps": spec["steps"], "batch_size": spec["batch"], "learning_rate": LR,
                      "lr_scheduler": "constant", "max_grad_norm": 1.0, "share_prompt": share_prompt},
            "eval": {"at_start": False},
        }],
    }


def run_aligner(tmp: Path, model_dir: Path, data: Path, spec: dict[str, Any], name: str,
                share_prompt: bool = True) -> Recorder:
    """aligner.train with its defaults; the window opens when the loop's setup starts."""
    import aligner.training.runner as loop
    from aligner import train
    from aligner.plugins import temporary_plugin

    recorder = Recorder()
    original = loop._setup

    def timed_setup(run, model, position):
        recorder.t_setup = time.perf_counter()
        return original(run, model, position)

    loop._setup = timed_setup
    try:
        with temporary_plugin(recorder, name=f"bench-{name}"):
            train(aligner_config(tmp, model_dir, data, spec, name, share_prompt))
    finally:
        loop._setup = original
    return recorder


# ----------------------------------------------------------------------------------------------
# TRL
def run_trl(tmp: Path, model_dir: Path, examples: list[dict[str, Any]], spec: dict[str, Any], precompute: bool,
            order: list[int] | None) -> dict[str, Any]:
    """TRL's DPOTrainer on the same token ids; ``order``: a fixed sample order (else TRL's shuffle)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    dataset = Dataset.from_list([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples])
    record: dict[str, Any] = {"step_times": [], "losses": []}

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            record["step_times"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized by aligner: the same token ids on both sides

        def _get_train_sampler(self, *args, **kwargs):
            return order if order is not None else super()._get_train_sampler(*args, **kwargs)

    # Same settings as aligner's run. TRL's DPOConfig defaults bf16=True and gradient_checkpointing=True;
    # both are off here so the comparison is of mechanisms, not of precision or recomputation.
    args = DPOConfig(output_dir=str(tmp / "trl"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", beta=BETA, max_length=None, bf16=False, fp16=False,
                     gradient_checkpointing=False, precompute_ref_log_probs=precompute, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                     disable_tqdm=True)
    policy = load_policy(model_dir)
    started = time.perf_counter()
    reference = load_policy(model_dir)  # TRL's default: a full reference copy, also used by its precompute
    trainer = Trainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[Steps()])
    trainer.remove_callback(PrinterCallback)  # no per-step log lines in the benchmark's output
    if precompute:
        del reference  # the precomputed values replace the copy during training
        trainer.ref_model = None
    trainer.train()
    record["seconds"] = record["step_times"][-1] - started
    return record


# ----------------------------------------------------------------------------------------------
# the floor
def run_floor(model_dir: Path, examples: list[dict[str, Any]], order: list[list[int]]) -> float:
    """Seconds for the policy's own forward + backward + AdamW step over ``order``'s batches."""
    from trl.trainer.utils import selective_log_softmax

    from aligner.data.batching import collate
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    pad = load_builtin_tokenizer().pad_token_id
    model = load_policy(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    batches = [collate([examples[i] for i in b], "preference", pad) for b in order]
    started = time.perf_counter()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps = selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:]) * batch["completion_mask"][:, 1:]
        logps.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def two_row_order(examples: list[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Batches grouped for the two-rows-per-pair layout (prompt + longest completion), seed 0.

    aligner groups pairs by prompt + chosen + rejected, the length of its one-row layout; the floor
    runs the standard layout, so it gets the grouping that pads that layout least.
    """
    from aligner.data.batching import LengthGroupedBatches

    lengths = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    sampler = LengthGroupedBatches(lengths, batch_size, seed=0)
    sampler.set_epoch(0)
    return sampler.batches()


def count_tokens(examples: list[dict[str, Any]], order: list[list[int]]) -> int:
    """Non-padding tokens of the chosen and rejected sequences of every batch."""
    return sum(2 * len(examples[i]["prompt_ids"]) + len(examples[i]["chosen_ids"]) + len(examples[i]["rejected_ids"])
               for b in order for i in b)


# ----------------------------------------------------------------------------------------------
# (d) peak memory, one side per fresh process
def memory_child(side: str, preset: str, tmp: Path) -> dict[str, Any]:
    spec = MEMORY_PRESETS[preset]
    model_dir, data = tmp / "model", tmp / "rows.jsonl"
    os.environ["ALIGNER_CACHE_DIR"] = str(tmp / f"cache-{side}")
    if side == "aligner":
        with PeakRSS() as rss:
            recorder = run_aligner(tmp, model_dir, data, spec, f"memory-{os.getpid()}")
        # the TRL child trains on exactly these token ids
        (tmp / "examples.json").write_text(json.dumps([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                                       for e in recorder.examples]))
        return {"peak_mib": rss.delta_mib, "losses": recorder.losses}
    examples = json.loads((tmp / "examples.json").read_text())
    with PeakRSS() as rss:
        record = run_trl(tmp, model_dir, examples, spec, precompute=False, order=None)
    return {"peak_mib": rss.delta_mib, "losses": record["losses"]}


def memory_case(preset: str, tmp: Path) -> dict[str, Any]:
    spec = MEMORY_PRESETS[preset]
    mem = tmp / "memory"
    mem.mkdir()
    save_model(mem / "model", spec, seed=0)
    write_rows(mem / "rows.jsonl", spec["steps"] * spec["batch"], spec["prompt"], spec["completion"], seed=1)
    out = {}
    for side in ("aligner", "trl"):
        # A fixed mmap threshold: every allocation over 64 KiB gets its own mapping and goes back to the
        # OS when freed, so RSS follows live memory instead of what glibc's heap happens to retain.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run([sys.executable, __file__, "--memory-child", side, "--preset", preset,
                                 "--tmp", str(mem), "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=False, env=env)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode != 0 or not lines:
            raise RuntimeError(f"memory run '{side}' failed:\n{result.stderr[-3000:]}")
        out[side] = json.loads(lines[-1][len("RESULT "):])
    return {"vocab": spec["vocab"], "aligner_mib": out["aligner"]["peak_mib"], "trl_mib": out["trl"]["peak_mib"],
            "ratio": out["aligner"]["peak_mib"] / out["trl"]["peak_mib"]}


# ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--rounds", type=int, help="rounds of every throughput case (median counts); "
                                                    "default 3, 1 with --quick")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, OpenMP threads that wait for a "
                             "busy core make timings swing tenfold)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out case (d)")
    parser.add_argument("--long-prompts", action="store_true",
                        help="prompts of 64-192 words instead of 8-48 (multi-turn-like data); informational")
    parser.add_argument("--memory-child", choices=["aligner", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print("RESULT " + json.dumps(memory_child(args.memory_child, args.preset, args.tmp)))
        return

    preset = "quick" if args.quick else "full"
    args.rounds = args.rounds or (1 if args.quick else 3)
    spec = {**PRESETS[preset], **(LONG_PROMPTS if args.long_prompts and not args.quick else {})}
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), load average {info['loadavg']}, torch {info['torch']}, "
          f"transformers {info['transformers']}, trl {info['trl']}")
    results: dict[str, Any] = {"machine": info, "preset": preset, "spec": spec}
    with tempfile.TemporaryDirectory(prefix="aligner-bench-") as name:
        tmp = Path(name)
        os.environ["ALIGNER_CACHE_DIR"] = str(tmp / "cache")  # a cold cache for the first aligner run
        model_dir = save_model(tmp / "model", spec, seed=0)
        data = write_rows(tmp / "rows.jsonl", spec["steps"] * spec["batch"], spec["prompt"], spec["completion"], seed=1)

        # a warm-up, so no case pays the process's one-off costs (thread pools, lazy imports)
        warm = run_aligner(tmp, model_dir, data, {**spec, "steps": 1}, "warmup")
        examples, order = warm.examples, warm.order
        flat_order = [i for b in order for i in b]
        floor_order = two_row_order(examples, spec["batch"])
        tokens = count_tokens(examples, order)
        assert len(flat_order) == len(examples) == spec["steps"] * spec["batch"]
        import shutil

        shutil.rmtree(tmp / "cache")  # cold again

        # Rounds of every case in turn; each case's median counts, so a burst of load from other
        # processes on a shared machine skews one round, not the result.
        cases = ("floor", "cold", "trl_default", "trl_pre", "warm", "warm_two_rows")
        times: dict[str, list[float]] = {k: [] for k in cases}
        for round_index in range(args.rounds):
            shutil.rmtree(tmp / "cache", ignore_errors=True)  # aligner's first run of a round is cold
            times["floor"].append(run_floor(model_dir, examples, floor_order))
            cold = run_aligner(tmp, model_dir, data, spec, f"cold-{round_index}")
            assert cold.order == order
            times["cold"].append(cold.step_times[-1] - cold.t_setup)
            trl_default = run_trl(tmp, model_dir, examples, spec, precompute=False, order=None)
            times["trl_default"].append(trl_default["seconds"])
            trl_pre = run_trl(tmp, model_dir, examples, spec, precompute=True, order=flat_order)
            times["trl_pre"].append(trl_pre["seconds"])
            warm_run = run_aligner(tmp, model_dir, data, spec, f"warm-{round_index}")
            times["warm"].append(warm_run.step_times[-1] - warm_run.t_setup)
            # What the shared-prompt layout is worth: the warm run with two rows per pair
            # (grouped for that layout, so its padding is the best that layout gets).
            two_rows = run_aligner(tmp, model_dir, data, spec, f"two-rows-{round_index}", share_prompt=False)
            times["warm_two_rows"].append(two_rows.step_times[-1] - two_rows.t_setup)
            print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
                  + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
        median = {k: statistics.median(v) for k, v in times.items()}
        floor, aligner_cold, aligner_warm = median["floor"], median["cold"], median["warm"]
        trl_default["seconds"], trl_pre["seconds"] = median["trl_default"], median["trl_pre"]
        loss_diff = max(abs(a - b) for a, b in zip(cold.losses, trl_pre["losses"], strict=True))

        def tps(seconds: float) -> float:
            return tokens / seconds

        results.update({
            "tokens": tokens, "steps": spec["steps"], "batch_size": spec["batch"],
            "padding_fraction_aligner": sum(cold.padding) / len(cold.padding),
            "padding_fraction_two_rows": sum(two_rows.padding) / len(two_rows.padding),
            "floor_s": floor, "aligner_cold_s": aligner_cold, "aligner_warm_s": aligner_warm,
            "trl_default_s": trl_default["seconds"], "trl_precompute_s": trl_pre["seconds"],
            "a_ratio": trl_default["seconds"] / aligner_cold, "b_ratio": trl_pre["seconds"] / aligner_cold,
            "c_ratio": aligner_warm / floor, "aligner_warm_two_rows_s": median["warm_two_rows"], "max_step_loss_diff_b": loss_diff,
            "aligner_losses": cold.losses, "trl_precompute_losses": trl_pre["losses"],
            "warm_reference_passes": warm_run.reference_passes, "rounds": times,
        })
        print(f"\nmedians of {args.rounds} rounds; {spec['steps']} steps x {spec['batch']} pairs, {tokens} non-padding tokens, "
              f"aligner padding fraction {results['padding_fraction_aligner']:.3f} "
              f"({results['padding_fraction_two_rows']:.3f} with share_prompt off)")
        print(f"{'run':44s} {'seconds':>8s} {'tokens/s':>9s}  ratio")
        rows = [("floor: policy forward+backward+step", floor, ""),
                ("aligner default (cold cache, incl. ref pass)", aligner_cold, ""),
                ("TRL default (reference copy)", trl_default["seconds"], f"(a) aligner {results['a_ratio']:.2f}x"),
                ("TRL precompute_ref_log_probs", trl_pre["seconds"], f"(b) aligner {results['b_ratio']:.2f}x"),
                ("aligner, warm cache", aligner_warm, f"(c) {results['c_ratio']:.2f}x the floor"),
                ("aligner, warm cache, share_prompt off", median["warm_two_rows"],
                 f"{median['warm_two_rows'] / floor:.2f}x the floor")]
        for label, seconds, ratio in rows:
            print(f"{label:44s} {seconds:8.2f} {tps(seconds):9.0f}  {ratio}")
        print(f"per-step losses, aligner vs TRL precompute: max |diff| {loss_diff:.2e} "
              f"(final {cold.losses[-1]:.6f} vs {trl_pre['losses'][-1]:.6f})")
        if not args.skip_memory:
            memory = memory_case(preset, tmp)
            results["memory"] = memory
            print(f"(d) vocab {memory['vocab']}: peak RSS over the run, aligner {memory['aligner_mib']:.0f} MiB, "
                  f"TRL default {memory['trl_mib']:.0f} MiB: {memory['ratio']:.2f}x")
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(f"load average at the end: {results['machine']['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
