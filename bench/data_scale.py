"""Rows to tokenized data at scale: peak RSS and CPU seconds, cold and warm, beside plain ``datasets``.

    OMP_NUM_THREADS=1 python bench/data_scale.py                 # 10k and 100k rows (docs/configuration.md)
    OMP_NUM_THREADS=1 python bench/data_scale.py --rows 1000000  # the 1M case of issue 16 (~10 minutes, <1 GB each)
    OMP_NUM_THREADS=1 python bench/data_scale.py --rows 2000 --json out.json   # a quick look

For each size a JSON Lines file of short generated preference rows is written once; then every
measurement runs in a fresh process (peak RSS is a per-process high-water mark, so cases sharing
a process would hide each other):

- ``aligner cold``: ``load_validated`` (stream, parse, validate, keep rows compactly, write the
  validated-rows cache) and ``tokenize_rows`` (joint prompt+completion tokenization with offsets,
  truncation) with an empty cache folder (``ALIGNER_CACHE_DIR``);
- ``aligner warm``: the same with the entries the cold run wrote (the rows memory-mapped from the
  validated-rows cache, the ids from the tokenized-data cache);
- ``datasets cold``: ``datasets.load_dataset("json")`` into a fresh cache folder and a batched
  ``Dataset.map`` tokenizing the same rendered prompt+chosen and prompt+rejected texts;
- ``datasets warm``: the same again, served from ``datasets``' own cache.

CPU seconds are user+system time of the work alone (imports excluded, same for every case); RSS
is the process's peak, imports included (``baseline RSS`` is what the imports alone take). The
tokenizer is aligner's built-in one (no download), the template ``plain``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a cat dog bird red blue green small big old kind calm happy sad house car boat tree river "
         "is was very quite not and or but because when where how why what tell me about describe").split()
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128


def generate(path: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` short preference rows (prompt ~12 words, completions ~8 words) as JSON Lines."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(6, 18))) + "?"
            chosen = " ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + "."
            rejected = " ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + "."
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> None:
    """Measure one case in this process and print it as JSON."""
    sys.path.insert(0, str(ROOT))
    from aligner.data.loading import load_validated
    from aligner.data.templates import load_template
    from aligner.data.token_cache import TokenCache
    from aligner.data.tokenize import tokenize_rows
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    template = load_template("plain", tokenizer, chat_data=False)
    import datasets

    datasets.disable_progress_bars()
    baseline_mb = _peak_mb()
    start_cpu, start_wall = _cpu(), time.perf_counter()
    phases: dict[str, float] = {}
    if args.case == "aligner":
        _, rows = load_validated(args.data, None)
        phases["load_cpu_s"] = _cpu() - start_cpu
        data = tokenize_rows(rows, "preference", tokenizer, template, MAX_LENGTH, MAX_PROMPT_LENGTH,
                             cache=TokenCache(Path(args.cache) / "tokenized"))
        count = len(data.examples)
    else:
        loaded = datasets.load_dataset("json", data_files=args.data, split="train", cache_dir=args.cache)
        phases["load_cpu_s"] = _cpu() - start_cpu

        def encode(batch: dict) -> dict:
            prompts = [template.prompt_text(p) for p in batch["prompt"]]
            return {f + "_ids": tokenizer([p + template.completion_text(c) for p, c in zip(prompts, batch[f],
                                                                                          strict=True)],
                                          add_special_tokens=False, truncation=True,
                                          max_length=MAX_LENGTH)["input_ids"]
                    for f in ("chosen", "rejected")}

        mapped = loaded.map(encode, batched=True, batch_size=1024, remove_columns=loaded.column_names)
        count = len(mapped)
    print(json.dumps({"cpu_s": _cpu() - start_cpu, "wall_s": time.perf_counter() - start_wall,
                      "peak_rss_mb": _peak_mb(), "baseline_rss_mb": baseline_mb, "examples": count, **phases}))


def _run(case: str, data: Path, cache: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", case, "--data", str(data), "--cache", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "ALIGNER_CACHE_DIR": str(cache)}  # both of aligner's data caches (rows, ids) go here
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        sys.exit(f"{case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(n: int, work: Path) -> dict[str, dict[str, float]]:
    """The four cases for ``n`` rows, in ``work``."""
    data = work / f"preference_{n}.jsonl"
    generate(data, n)
    aligner_cache, datasets_cache = work / f"aligner_{n}", work / f"datasets_{n}"
    return {"aligner cold": _run("aligner", data, aligner_cache),
            "aligner warm": _run("aligner", data, aligner_cache),
            "datasets cold": _run("datasets", data, datasets_cache),
            "datasets warm": _run("datasets", data, datasets_cache)}


def report(n: int, cases: dict[str, dict[str, float]]) -> str:
    """A table of one size's cases and the ratios that issue 16 sets targets for."""
    lines = [f"{n:,} rows", f"  {'case':<14} {'CPU s':>8} {'(load)':>8} {'peak RSS MB':>12} {'baseline MB':>12}"]
    for name, m in cases.items():
        lines.append(f"  {name:<14} {m['cpu_s']:>8.2f} {m['load_cpu_s']:>8.2f} {m['peak_rss_mb']:>12.0f} "
                     f"{m['baseline_rss_mb']:>12.0f}")
    cold, warm, base = cases["aligner cold"], cases["aligner warm"], cases["datasets cold"]
    lines.append(f"  aligner cold / datasets cold CPU: {cold['cpu_s'] / base['cpu_s']:.2f}x;  "
                 f"warm / cold CPU: {warm['cpu_s'] / cold['cpu_s']:.1%};  "
                 f"RSS over baseline, aligner cold / datasets cold: "
                 f"{(cold['peak_rss_mb'] - cold['baseline_rss_mb']) / max(base['peak_rss_mb'] - base['baseline_rss_mb'], 1):.1f}x")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark (or, with ``--child``, one of its cases)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000],
                        help="sizes to measure (default 10000 100000; issue 16's largest is 1000000)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--child", choices=("aligner", "datasets"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.case = args.child
        child(args)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="aligner-data-scale-") as work:
        for n in args.rows:
            results[n] = measure(n, Path(work))
            print(report(n, results[n]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({str(n): cases for n, cases in results.items()}, indent=2))


if __name__ == "__main__":
    main()
