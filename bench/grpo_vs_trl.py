"""aligner's GRPO vs TRL's GRPOTrainer on the same GRPO work: completions per second.

Run:  python bench/grpo_vs_trl.py                 (the full benchmark, about 3 minutes on 2 CPU cores, 1 thread)
      python bench/grpo_vs_trl.py --quick         (a tiny smoke run, well under a minute; ratios mean nothing)
      python bench/grpo_vs_trl.py --json out.json (also write every number and the per-round times)

Both sides train the same tiny Llama-style model (built from a config and saved to a temporary
directory, which both load) with the same settings, in one invocation of this script:

- the same prompts: synthetic rows of random words, each exactly 64 tokens as the model sees it
  (aligner renders a row with its ``plain`` template, which appends one space; TRL gets that
  rendered text, and the script checks that both sides' prompt token ids are identical);
- group size 8 (TRL ``num_generations``), 32 new tokens (TRL ``max_completion_length``),
  temperature 1, top-p 1, no top-k, each trainer with its own sampler (TRL: transformers'
  ``generate``; aligner: its rollout sampler, whatever it is at the time);
- the same number of prompts per step (one rollout per step: aligner ``train.batch_size`` prompts,
  TRL ``per_device_train_batch_size`` = prompts x 8 completions, one gradient-accumulation step),
  the whole rollout sampled as one batch on both sides (aligner ``generation_batch_size``), and the
  same number of steps (one epoch over the prompts on both sides);
- one update per rollout (no old-log-prob pass on either side), no KL (aligner ``kl_coef: 0``: no
  reference; TRL ``beta=0.0``: no reference model), the clipped surrogate with token-mean
  aggregation (TRL's default ``loss_type="dapo"``) and group-std-scaled advantages on both;
- AdamW (lr 1e-5, no weight decay, constant schedule), clipping 1.0, float32 (TRL's ``bf16``
  default and ``gradient_checkpointing`` default turned off);
- the same reward: ``length_reward`` below (characters of the decoded completion / 100), a cheap
  deterministic Python function given to TRL as a reward function and to aligner by dotted path
  (``rewards: [{function: "bench.grpo_vs_trl:length_reward"}]``).

EOS. The model is random; with a 2,048-token vocabulary it would sample EOS with a probability of
about 1/2,048 per token, so about 1.5% of 32-token completions would stop early, differently on
each side. Neither trainer has an option to ignore EOS (``min_new_tokens`` in a generation config
reaches TRL's ``generate`` but not a sampler of aligner's own), so the model's weights make EOS
impossible instead (``make_eos_impossible``): every completion has exactly 32 tokens on both sides,
whatever the sampler. The reward function counts every completion and its tokens on both sides; the
script prints the mean completion length of each and tokens/s beside completions/s, and warns if
the lengths differ.

Timed window (per run): from the start of training setup (aligner: its stage setup, i.e. the policy
put in train mode, the algorithm's setup and the optimizer; TRL: building the ``GRPOTrainer``, then
its ``train()`` setup) to the end of the last optimizer step. Inside the window: every rollout (for
TRL also prompt tokenization, which aligner does before the window), the reward calls, advantages,
the policy's forward and backward, clipping, AdamW, per-step logging (aligner: metrics.jsonl and
the step-1 rollout sample file; TRL: its metrics). Outside: model loading, aligner's data reading
and tokenization, the final model save, process start-up and imports (a warm-up run of each side
pays the one-off costs first). The window is split into setup (before the first step), rollouts
(each step from its start to its reward call: sampling, decoding) and updates (the rest of each
step: rewards, advantages, forward, backward, optimizer, logging), read from the reward function's
call times and each trainer's step hooks or callbacks; neither trainer is instrumented (the opening
of aligner's window is read by wrapping its loop's setup function, as bench/dpo_vs_trl.py does, or
from its on_run_start hook if that function is gone). The process's CPU seconds over the window are
reported too: on a machine shared with other processes they move much less than wall time.

Every run is repeated in 3 interleaved rounds (the side that goes first alternates) and the
median counts. Torch runs with one thread (``--threads``), as in bench/dpo_vs_trl.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# aligner imports the reward function by its dotted path: run as a script, this module is that path,
# so the counters below are shared by both trainers (and the module is not executed twice).
sys.modules.setdefault("bench.grpo_vs_trl", sys.modules[__name__])

from aligner.hookspecs import hookimpl  # noqa: E402

REWARD_PATH = "bench.grpo_vs_trl:length_reward"
WORDS = ("the a an of to in is and it you that was for on are with as his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said each she which "
         "do their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find good kind happy warm gentle bright calm").split()

PRESETS = {
    # model: hidden, layers, heads, intermediate, vocab (the DPO benchmark's model); work per run
    "full": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=2048, prompts_per_step=8, steps=10,
                 prompt_tokens=64, group=8, max_new_tokens=32),
    "quick": dict(hidden=32, layers=1, heads=2, intermediate=64, vocab=2048, prompts_per_step=2, steps=2,
                  prompt_tokens=64, group=8, max_new_tokens=32),
}
LR = 1e-5
TARGET = 1.5


# ----------------------------------------------------------------------------------------------
# the reward (shared by both trainers) and the counters it keeps
COUNTS: dict[str, Any] = {"calls": [], "completions": 0, "tokens": 0, "full_length": 0, "max_new_tokens": 0}


def length_reward(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                  **kwargs: Any) -> list[float]:
    """Characters of each decoded completion / 100: cheap, deterministic, different within a group.

    TRL's signature (aligner calls reward functions the same way). For the benchmark it also notes
    when it was called (the end of the step's rollout) and counts completions and completion tokens
    (EOS included when sampled), identically on both sides.
    """
    COUNTS["calls"].append(time.perf_counter())
    COUNTS["completions"] += len(completions)
    if completion_ids is not None:
        COUNTS["tokens"] += sum(len(ids) for ids in completion_ids)
        COUNTS["full_length"] += sum(len(ids) >= COUNTS["max_new_tokens"] for ids in completion_ids)
    return [len(c if isinstance(c, str) else str(c)) / 100 for c in completions]


def reset_counts(max_new_tokens: int) -> None:
    COUNTS.update(calls=[], completions=0, tokens=0, full_length=0, max_new_tokens=max_new_tokens)


# ----------------------------------------------------------------------------------------------
# machine facts
def machine() -> dict[str, Any]:
    """nproc, CPU model, load average, versions, the code's commit."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import transformers
    import trl

    import aligner

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    return {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": model,
            "loadavg": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "aligner": str(Path(aligner.__file__).parent), "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


# ----------------------------------------------------------------------------------------------
# the shared setup: model, prompts
def write_prompts(path: Path, n: int, tokens: int, seed: int) -> list[str]:
    """``n`` prompt rows of random words whose text, as aligner's ``plain`` template renders it (the
    prompt and one space), is exactly ``tokens`` tokens; returns those rendered texts (TRL's prompts)."""
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    rng = random.Random(seed)
    rendered = []
    with open(path, "w") as f:
        while len(rendered) < n:
            words: list[str] = []
            while len(tok(" ".join(words) + " ", add_special_tokens=False)["input_ids"]) < tokens:
                words.append(rng.choice(WORDS))
            text = " ".join(words)
            if len(tok(text + " ", add_special_tokens=False)["input_ids"]) != tokens:
                continue  # the last word overshot: draw another prompt
            f.write(json.dumps({"prompt": text}) + "\n")
            rendered.append(text + " ")
    return rendered


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
    model = LlamaForCausalLM(config)
    make_eos_impossible(model, tok.eos_token_id)
    model.save_pretrained(directory)
    return directory


def make_eos_impossible(model: torch.nn.Module, eos: int, dim: int = 0) -> None:
    """Weights with which the model never samples EOS, whatever the sampler, so that every completion
    has ``max_new_tokens`` tokens on both sides (otherwise a random model with a 2,048-token vocabulary
    ends about 1.5% of 32-token completions early, differently on each side).

    The residual stream's coordinate ``dim`` is made a positive constant: every token embedding has
    0.1 there and no layer writes to it (the rows ``dim`` of every ``o_proj`` and ``down_proj`` are
    zero), so after the final RMSNorm (weights 1) that coordinate is positive at every position. The
    EOS embedding, which is also its output row (tied embeddings; EOS is never an input here), is
    -100 there and 0 elsewhere: its logit is far below every other token's (its log-probability
    is below -50 at every position: never sampled). The other tokens all have the same value in
    that coordinate, which shifts their logits equally and leaves their distribution as it was.
    Compute is unchanged (same shapes); training moves these weights by ~lr per step, far too
    little to matter here.
    """
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, dim] = 0.1
        embedding[eos] = 0.0
        embedding[eos, dim] = -100.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dim] = 0.0
            layer.mlp.down_proj.weight[dim] = 0.0


def load_policy(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def run_summary(started: float, step_starts: list[float], step_ends: list[float], steps: int,
                cpu: float) -> dict[str, Any]:
    """The window and its parts, and what the reward function counted.

    A step's rollout is the time from its start to its first reward call (sampling and decoding the
    completions; TRL also tokenizes the prompts there); its update is the rest (rewards, advantages,
    forward, backward, clipping, AdamW, logging). Setup is the window before the first step.
    ``cpu``: the process's CPU seconds over the window (less sensitive than wall time to other
    processes competing for the cores).
    """
    if len(step_ends) != steps or len(step_starts) != steps:
        raise RuntimeError(f"expected {steps} optimizer steps, saw {len(step_ends)}")
    calls = COUNTS["calls"]
    rollout = []
    for begin, end in zip(step_starts, step_ends, strict=True):
        first = [t for t in calls if begin <= t <= end]
        rollout.append(first[0] - begin if first else float("nan"))
    return {"seconds": step_ends[-1] - started, "cpu_s": cpu, "setup_s": step_starts[0] - started,
            "rollout_s": sum(rollout),
            "update_s": sum(e - b for b, e in zip(step_starts, step_ends, strict=True)) - sum(rollout),
            "step_s": [e - b for b, e in zip(step_starts, step_ends, strict=True)], "step_rollout_s": rollout,
            "completions": int(COUNTS["completions"]), "tokens": int(COUNTS["tokens"]),
            "full_length": int(COUNTS["full_length"]), "reward_calls": len(calls)}


# ----------------------------------------------------------------------------------------------
# aligner
class Recorder:
    """Hooks into aligner's loop (public plugin hooks): setup end, step ends, the rollout metrics."""

    def __init__(self):
        self.t_setup: float | None = None
        self.cpu_start = self.cpu_end = 0.0
        self.t_run_start: float | None = None
        self.step_ends: list[float] = []
        self.step_seconds: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.prompt_ids: list[list[int]] = []

    @hookimpl
    def on_run_start(self, run):
        self.t_run_start = time.perf_counter()
        if self.t_setup is None:
            self.cpu_start = time.process_time()
        self.prompt_ids = [e["prompt_ids"] for e in run.stage.train_data.examples]

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.step_ends.append(time.perf_counter())
        self.cpu_end = time.process_time()
        self.step_seconds.append(float(metrics.get("seconds_per_step", float("nan"))))
        self.metrics.append({k: float(metrics[k]) for k in ("response_length", "eos_fraction", "reward/mean")
                             if k in metrics})


def aligner_config(tmp: Path, model_dir: Path, data: Path, spec: dict[str, Any], steps: int,
                   name: str) -> dict[str, Any]:
    rollout = spec["prompts_per_step"] * spec["group"]
    return {
        "output_dir": str(tmp / f"aligner-{name}"), "seed": 0,
        "model": {"path": str(model_dir)}, "tokenizer": "builtin",
        "stages": [{
            "name": "grpo",
            "data": {"train": str(data), "template": "plain", "max_length": 256},
            "algorithm": {
                "name": "grpo", "rewards": [{"function": REWARD_PATH}],
                "group_size": spec["group"], "max_new_tokens": spec["max_new_tokens"],
                "temperature": 1.0, "top_p": 1.0, "kl_coef": 0.0, "aggregation": "token-mean",
                "epochs": 1, "mini_batches": 1,
                "generation_batch_size": rollout,  # the whole rollout as one sampling batch, as TRL
                "sample_every": 10**6, "num_samples": 1,  # only step 1 writes (and prints) rollout samples
            },
            "train": {"max_steps": steps, "batch_size": spec["prompts_per_step"], "learning_rate": LR,
                      "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
            "eval": {"at_start": False},
        }],
    }


def run_aligner(tmp: Path, model_dir: Path, data: Path, spec: dict[str, Any], steps: int, name: str) -> dict[str, Any]:
    """aligner.train on the GRPO config; the window opens when the stage's setup starts."""
    from aligner import train
    from aligner.plugins import temporary_plugin

    recorder = Recorder()
    reset_counts(spec["max_new_tokens"])
    # The window opens at the loop's setup where that function exists (as in bench/dpo_vs_trl.py), else at
    # the on_run_start hook (after setup; without a reference GRPO's setup is the optimizer, milliseconds).
    import aligner.training.runner as loop

    original = getattr(loop, "_setup", None)
    if original is not None:
        def timed_setup(*args: Any, **kwargs: Any) -> Any:
            recorder.t_setup, recorder.cpu_start = time.perf_counter(), time.process_time()
            return original(*args, **kwargs)

        loop._setup = timed_setup
    try:
        # aligner prints a table of rollout samples at step 1: kept out of the benchmark's output
        with temporary_plugin(recorder, name=f"bench-{name}"), contextlib.redirect_stdout(io.StringIO()):
            train(aligner_config(tmp, model_dir, data, spec, steps, name))
    finally:
        if original is not None:
            loop._setup = original
    started = recorder.t_setup if recorder.t_setup is not None else recorder.t_run_start
    # A step starts where the runner's seconds_per_step begins (else where the previous one ended).
    step_starts = [end - s if s == s else previous for end, s, previous in
                   zip(recorder.step_ends, recorder.step_seconds, [recorder.t_run_start, *recorder.step_ends],
                       strict=False)]
    out = run_summary(started, step_starts, recorder.step_ends, steps, recorder.cpu_end - recorder.cpu_start)
    out["metrics"] = recorder.metrics
    out["prompt_ids"] = recorder.prompt_ids
    return out


# ----------------------------------------------------------------------------------------------
# TRL
def run_trl(tmp: Path, model_dir: Path, prompts: list[str], spec: dict[str, Any], steps: int,
            name: str) -> dict[str, Any]:
    """TRL's GRPOTrainer with the same settings; the window opens when the trainer is built."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    dataset = Dataset.from_list([{"prompt": p} for p in prompts[:steps * spec["prompts_per_step"]]])
    rollout = spec["prompts_per_step"] * spec["group"]
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
                     else "gradient_checkpointing")
    record: dict[str, Any] = {"begin": [], "end": [], "logs": []}

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            record["end"].append(time.perf_counter())
            record["cpu_end"] = time.process_time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                record["logs"].append({k: v for k, v in logs.items() if isinstance(v, int | float)})

    # One rollout of prompts x 8 completions per optimizer step, used for exactly one update
    # (gradient_accumulation_steps = steps_per_generation = num_iterations = 1: no old-log-prob pass).
    # TRL's GRPOConfig defaults bf16=True and gradient_checkpointing=True: both off (float32, no recomputation).
    args = GRPOConfig(
        output_dir=str(tmp / f"trl-{name}"), max_steps=steps, per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1, num_generations=spec["group"], num_iterations=1,
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        loss_type="dapo", scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
        # transformers 5 renamed gradient_checkpointing (now a deprecated alias) to activation_checkpointing
        **{checkpointing: False})
    if args.bf16 or args.gradient_checkpointing:
        raise RuntimeError("TRL would train in bf16 or with gradient checkpointing")
    policy = load_policy(model_dir)
    reset_counts(spec["max_new_tokens"])
    started, cpu_start = time.perf_counter(), time.process_time()
    trainer = GRPOTrainer(model=policy, reward_funcs=[length_reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Steps()])
    trainer.remove_callback(PrinterCallback)  # no per-step log lines in the benchmark's output
    trainer.train()
    out = run_summary(started, record["begin"], record["end"], steps, record["cpu_end"] - cpu_start)
    out["metrics"] = [{k: log[k] for k in ("completions/mean_length", "completions/clipped_ratio", "reward")
                       if k in log} for log in record["logs"] if "completions/mean_length" in log]
    return out


# ----------------------------------------------------------------------------------------------
def side_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of one side's runs (each part of the window is its own median)."""
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    middle = min(runs, key=lambda r: abs(r["seconds"] - median))
    return {"seconds": median, "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "completions": middle["completions"], "tokens": middle["tokens"],
            "completions_per_s": middle["completions"] / median, "tokens_per_s": middle["tokens"] / median,
            "mean_length": middle["tokens"] / max(middle["completions"], 1),
            "full_length_share": middle["full_length"] / max(middle["completions"], 1),
            "setup_s": statistics.median(r["setup_s"] for r in runs),
            "rollout_s": statistics.median(r["rollout_s"] for r in runs),
            "update_s": statistics.median(r["update_s"] for r in runs), "rounds_s": seconds,
            "rounds_cpu_s": [r["cpu_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, well under a minute")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--rounds", type=int, help="rounds (median counts); default 3, 1 with --quick")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, OpenMP threads that wait for a "
                             "busy core make timings swing)")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    preset = "quick" if args.quick else "full"
    spec = dict(PRESETS[preset])
    if args.steps:
        spec["steps"] = args.steps
    rounds = args.rounds or (1 if args.quick else 3)
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), load average {info['loadavg']}, torch {info['torch']} "
          f"({info['torch_threads']} threads), transformers {info['transformers']}, trl {info['trl']}, "
          f"aligner from {info['aligner']}, commit {info['commit'] or 'unknown'}"
          f"{' (with uncommitted changes)' if info['uncommitted_changes'] else ''}")
    results: dict[str, Any] = {"machine": info, "preset": preset, "spec": spec, "rounds": rounds}
    wall = time.perf_counter()
    steps, per_step = spec["steps"], spec["prompts_per_step"]
    with tempfile.TemporaryDirectory(prefix="aligner-grpo-bench-") as name:
        tmp = Path(name)
        os.environ["ALIGNER_CACHE_DIR"] = str(tmp / "cache")
        model_dir = save_model(tmp / "model", spec, seed=0)
        data = tmp / "prompts.jsonl"
        prompts = write_prompts(data, steps * per_step, spec["prompt_tokens"], seed=1)

        # Warm-ups (one step each), so that no timed run pays the process's one-off costs; they also
        # check that both sides see the same prompt token ids.
        warm_aligner = run_aligner(tmp, model_dir, data, spec, 1, "warmup")
        run_trl(tmp, model_dir, prompts, spec, 1, "warmup")
        from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

        tokenizer = load_builtin_tokenizer()  # what TRL's GRPOTrainer does with a text prompt
        trl_ids = [tokenizer(text=p)["input_ids"] for p in prompts]
        if sorted(warm_aligner["prompt_ids"]) != sorted(trl_ids):
            raise RuntimeError("aligner and TRL tokenize the prompts differently")
        lengths = {len(ids) for ids in warm_aligner["prompt_ids"]}
        if lengths != {spec["prompt_tokens"]}:
            raise RuntimeError(f"prompt lengths {sorted(lengths)}, expected {spec['prompt_tokens']}")

        runs: dict[str, list[dict[str, Any]]] = {"aligner": [], "trl": []}
        for index in range(rounds):
            order = ("aligner", "trl") if index % 2 == 0 else ("trl", "aligner")
            for side in order:
                if side == "aligner":
                    run = run_aligner(tmp, model_dir, data, spec, steps, f"round-{index}")
                else:
                    run = run_trl(tmp, model_dir, prompts, spec, steps, f"round-{index}")
                run.pop("prompt_ids", None)
                runs[side].append(run)
            print(f"round {index + 1}: " + ", ".join(
                f"{side} {runs[side][-1]['seconds']:.2f}s (rollouts {runs[side][-1]['rollout_s']:.2f}s, "
                f"{runs[side][-1]['tokens']} tokens)" for side in order)
                + f"; load average {os.getloadavg()[0]:.2f}", flush=True)

    rows = {side: side_row(side_runs) for side, side_runs in runs.items()}
    a, t = rows["aligner"], rows["trl"]
    ratio = a["completions_per_s"] / t["completions_per_s"]
    token_ratio = a["tokens_per_s"] / t["tokens_per_s"]
    per_round = [(ra["completions"] / ra["seconds"]) / (rt["completions"] / rt["seconds"])
                 for ra, rt in zip(runs["aligner"], runs["trl"], strict=True)]
    cpu_ratio = t["cpu_s"] / a["cpu_s"]
    results.update({"aligner": a, "trl": t, "ratio_completions_per_s": ratio, "ratio_tokens_per_s": token_ratio,
                    "ratio_per_round": per_round, "ratio_cpu": cpu_ratio, "target": TARGET, "met": ratio >= TARGET, "runs": runs})

    print(f"\nmedians of {rounds} round(s); {steps} steps x {per_step} prompts x {spec['group']} completions "
          f"= {steps * per_step * spec['group']} completions per run; prompts {spec['prompt_tokens']} tokens, "
          f"max_new_tokens {spec['max_new_tokens']}")
    print(f"{'trainer':18s} {'seconds':>8s} {'cpu s':>7s} {'compl/s':>8s} {'tokens/s':>9s} {'mean len':>8s} "
          f"{'setup':>13s} {'rollouts':>13s} {'updates':>13s}")
    for label, row in (("aligner GRPO", a), ("TRL GRPOTrainer", t)):
        parts = " ".join(f"{row[k]:6.2f}s ({row[k] / row['seconds']:4.0%})" for k in ("setup_s", "rollout_s", "update_s"))
        print(f"{label:18s} {row['seconds']:8.2f} {row['cpu_s']:7.2f} {row['completions_per_s']:8.2f} {row['tokens_per_s']:9.1f} "
              f"{row['mean_length']:8.2f} {parts}")
    print(f"ratio aligner/TRL: {ratio:.2f}x completions/s ({token_ratio:.2f}x generated tokens/s); "
          f"per round {', '.join(f'{r:.2f}x' for r in per_round)}; target >= {TARGET}x: "
          f"{'met' if ratio >= TARGET else 'not met'}; CPU seconds TRL/aligner {cpu_ratio:.2f}x")
    if abs(a["mean_length"] - t["mean_length"]) > 0.02 * max(a["mean_length"], t["mean_length"]):
        print(f"WARNING: mean completion lengths differ ({a['mean_length']:.2f} vs {t['mean_length']:.2f} tokens): "
              "compare tokens/s, not completions/s")
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - wall
    print(f"load average at the end: {results['machine']['loadavg_end']}; total {results['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
