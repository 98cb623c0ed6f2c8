"""Held-out evaluation: the stage's losses and metrics on eval rows, and judged generations."""

from __future__ import annotations

import torch

from aligner.data.batching import LengthGroupedBatches, stage_collate, stage_lengths
from aligner.online.sampler import decode, sample_completions
from aligner.reporting.metrics import to_float
from aligner.reporting.samples import write_sample_file
from aligner.training.micro_batch import compute_losses, move_to
from aligner.training.run_state import RunState


@torch.no_grad()
def evaluate_losses(run: RunState, model: torch.nn.Module) -> dict[str, float]:
    """Mean of every loss metric over the eval rows (weighted by rows per batch).

    With several processes each scores every N-th batch and the sums are added up, so the eval
    set is run once in all, not once per process.
    """
    stage, accelerator = run.stage, run.accelerator
    examples = stage.eval_data.examples
    order = list(LengthGroupedBatches(stage_lengths(stage, stage.eval_data), stage.config.eval.batch_size, seed=0,
                                      shuffle=False))
    collate = stage_collate(stage, run.tokenizer.pad_token_id)
    processes = accelerator.num_processes
    mine = order[accelerator.process_index::processes]
    # Every process runs the same number of forwards (DDP's buffer sync and KTO's pooled KL are
    # collectives): a short shard repeats a batch that counts for nothing.
    padding = -(-len(order) // processes) - len(mine)
    weights = [1.0] * len(mine) + [0.0] * padding
    sums: dict[str, float] = {}
    count = 0.0
    for indices, weight in zip(mine + order[:1] * padding, weights, strict=True):
        batch = move_to(collate([examples[i] for i in indices]), accelerator.device)
        _, metrics = compute_losses(model, stage, batch)
        rows = len(batch["row_ids"]) * weight
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + to_float(value) * rows
        count += rows
    keys = sorted(sums)
    if processes > 1:
        pooled = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=accelerator.device)
        *values, count = accelerator.reduce(pooled, reduction="sum").tolist()
        sums = dict(zip(keys, values, strict=True))
    return {f"eval/{k}": sums[k] / count for k in keys}


def evaluate_generations(run: RunState, model: torch.nn.Module) -> dict[str, float]:
    """Judge sampled completions for held-out prompts: ``eval/judge_score`` (mean) and a samples file."""
    settings = run.stage.config.eval.generate
    examples = run.stage.eval_data.examples[: settings.num_prompts]
    unwrapped = run.accelerator.unwrap_model(model)
    # A private RNG stream: evaluating never changes the training run.
    completions = sample_completions(unwrapped, run.tokenizer, [e["prompt_ids"] for e in examples],
                                     max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                     top_p=settings.top_p, batch_size=settings.batch_size, seed=run.config.seed)
    texts = decode(run.tokenizer, completions)
    prompts = [e["prompt"] for e in examples]
    rows = [run.stage.eval_rows[e["row_id"]] for e in examples]
    sources = run.stage.eval_rewards
    scored = sources.score(prompts, texts, completions, [{k: v for k, v in r.data.items() if k != "prompt"} for r in rows],
                           [r.location for r in rows])
    scores = scored.total.tolist()
    run.last_samples = [{"prompt": p, "completion": t, "score": s,
                         **({n: scored.raw[n][i] for n in sources.names} if settings.rewards is not None else {})}
                        for i, (p, t, s) in enumerate(zip(prompts, texts, scores, strict=True))]
    if run.is_main_process:
        write_sample_file(run.stage_dir, f"step-{run.step}.jsonl", run.last_samples)
    if settings.judge is not None:
        return {"eval/judge_score": sum(scores) / len(scores)}
    # Each source's mean where it applies (a verifier's: held-out accuracy), and the weighted total.
    per_source = {f"eval/{k}": v for k, v in sources.metrics(scored.raw, "rewards/").items() if k.endswith("/mean")}
    return {"eval/reward": sum(scores) / len(scores), **per_source}


def evaluate(run: RunState, model: torch.nn.Module) -> dict[str, float]:
    """All held-out metrics of the stage at the current step (empty without eval rows)."""
    if run.stage.eval_data is None or not run.stage.eval_data.examples:
        return {}
    was_training = model.training
    model.eval()
    try:
        metrics = evaluate_losses(run, model)
        if run.stage.eval_rewards is not None:
            metrics.update(evaluate_generations(run, model))
    finally:
        model.train(was_training)
    return metrics
