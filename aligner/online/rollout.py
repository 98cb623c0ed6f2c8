"""Rollouts: the prompt stream of an online stage, sampling G completions per prompt, scoring them,
and collating the result into one batch whose per-token columns every later pass shares.

Groups: the ``G`` samples of one prompt are consecutive rows with the same ``group_ids`` entry (the
prompt's index in the train data), and always live on the same process, so group statistics
(GRPO's mean and std, RLOO's leave-one-out mean) need no communication.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from aligner.data.batching import LengthGroupedBatches, collate
from aligner.modeling.logprobs import token_window_start
from aligner.online.engines import GenerationRequest
from aligner.online.sampler import decode
from aligner.protocols import SFT
from aligner.reporting.samples import write_sample_file
from aligner.training.micro_batch import move_to
from aligner.training.resume import Position
from aligner.training.run_state import RunState


def prompt_batches(run: RunState, start: Position) -> Iterator[tuple[int, int, list[int]]]:
    """Endless ``(epoch, batches consumed in the epoch, prompt indices)`` of the global batch
    (``train.batch_size`` prompts), reshuffled every epoch, from a data position on.

    Only full batches: an epoch's short last batch is left out, so that every process always gets
    the same share (their numbers of updates, which are collectives, must match).
    """
    stage = run.stage
    size = stage.config.train.batch_size
    sampler = LengthGroupedBatches(stage.train_data.lengths(), size, seed=run.config.seed + stage.index,
                                   group_by_length=False)
    epoch, skip = start.epoch, start.batches_in_epoch
    while True:
        sampler.set_epoch(epoch, skip=skip)
        for consumed, indices in enumerate(sampler, start=skip + 1):
            if len(indices) == size:
                yield epoch, consumed, indices
        epoch, skip = epoch + 1, 0


def shard(indices: list[int], process_index: int, num_processes: int) -> list[int]:
    """This process's share of a global batch of prompt indices (every N-th, so shares differ by at most one)."""
    return indices[process_index::num_processes]


def rollout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                  row_ids: list[int] | None = None) -> dict[str, Any]:
    """Right-padded tensors for (prompt, completion) pairs, exactly as SFT batches are collated.

    An empty completion keeps one pad token so that every row has a completion position. ``row_ids``
    (the prompts' indices in the train data) let the non-finite guard name the rows of a bad step.
    """
    ids = row_ids if row_ids is not None else list(range(len(prompt_ids)))
    examples = [{"row_id": r, "prompt_ids": p, "completion_ids": c or [pad_token_id]}
                for r, p, c in zip(ids, prompt_ids, completion_ids, strict=True)]
    return collate(examples, data_format=SFT, pad_token_id=pad_token_id)


@dataclass
class Rollout:
    """Sampled completions for a list of prompts (``group_size`` consecutive rows per prompt) and their scores.

    ``scores`` are the judge's raw scores; ``ended`` says which completions stopped at an
    end-of-sequence token (the others hit ``max_new_tokens``); ``row_ids`` are the prompts' indices
    in the train data (the non-finite guard names them). Groups are numbered by position, never by
    prompt: one prompt drawn twice (a refill crossing an epoch) makes two groups.
    """

    prompts: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    row_ids: list[int]
    scores: torch.Tensor
    ended: torch.Tensor
    group_size: int
    sources: dict[str, list[float | None]]  # each reward source's own values (None: does not apply)
    generator_logps: list[list[float]]  # the engine's log-prob of each completion token

    @property
    def group_ids(self) -> torch.Tensor:
        """``[N]``: rows with equal ids are the samples of one prompt in this rollout."""
        return torch.arange(len(self.row_ids), device=self.scores.device) // self.group_size

    @property
    def lengths(self) -> torch.Tensor:
        """Completion tokens per row."""
        return torch.tensor([len(c) for c in self.completion_ids], device=self.scores.device)

    def batch(self, pad_token_id: int) -> dict[str, Any]:
        """The rows collated on the scores' device, with ``window_start`` fixed so that rows taken from it
        (``rows_of``) keep its per-token columns."""
        batch = move_to(rollout_batch(self.prompt_ids, self.completion_ids, pad_token_id, self.row_ids),
                        self.scores.device)
        batch["window_start"] = token_window_start(batch)
        # Rows of a group share their prompt: the training forward may hold it once per group.
        batch["share_prompt_groups"] = self.group_size > 1
        return batch

    def token_generator_logps(self, mask: torch.Tensor) -> torch.Tensor:
        """The engine's log-probs laid out like ``completion_logprobs(token_level=True)`` values, whose
        completion-token ``mask`` is given (0 elsewhere)."""
        values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        # An empty completion is collated as one pad token; it gets log-prob 0 (it is never trained on).
        flat = [v for logps in self.generator_logps for v in (logps or [0.0])]
        values[mask] = torch.tensor(flat, dtype=torch.float32, device=mask.device)
        return values

    def select(self, rows: list[int]) -> Rollout:
        """The same rollout restricted to ``rows`` (whole groups, in order)."""
        return Rollout([self.prompts[i] for i in rows], [self.prompt_ids[i] for i in rows],
                       [self.completion_ids[i] for i in rows], [self.texts[i] for i in rows],
                       [self.row_ids[i] for i in rows], self.scores[rows], self.ended[rows], self.group_size,
                       {name: [values[i] for i in rows] for name, values in self.sources.items()},
                       [self.generator_logps[i] for i in rows])

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """One rollout of the rows of ``parts``, in order."""
        return Rollout([x for p in parts for x in p.prompts], [x for p in parts for x in p.prompt_ids],
                       [x for p in parts for x in p.completion_ids], [x for p in parts for x in p.texts],
                       [x for p in parts for x in p.row_ids], torch.cat([p.scores for p in parts]),
                       torch.cat([p.ended for p in parts]), parts[0].group_size,
                       {name: [v for p in parts for v in p.sources[name]] for name in parts[0].sources},
                       [x for p in parts for x in p.generator_logps])


def generate_rollout(run: RunState, policy: torch.nn.Module, rewards: Any, engine: Any, indices: list[int], *,
                     group_size: int, max_new_tokens: int, temperature: float, top_p: float,
                     batch_size: int) -> Rollout:
    """Sample ``group_size`` completions for each prompt of ``indices`` (train-data indices) with the
    generation ``engine`` and score them with the reward sources
    (``aligner.online.reward_sources.RewardSources``)."""
    tokenizer, device = run.tokenizer, run.accelerator.device
    examples = [run.stage.train_data.examples[i] for i in indices]
    generated = engine.generate(policy, tokenizer, GenerationRequest(
        prompt_ids=[e["prompt_ids"] for e in examples], samples_per_prompt=group_size, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, batch_size=batch_size, policy_version=run.step))
    completions = generated.completion_ids
    texts = decode(tokenizer, completions)
    prompt_ids = [e["prompt_ids"] for e in examples for _ in range(group_size)]
    prompts = [e["prompt"] for e in examples for _ in range(group_size)]
    row_ids = [e["row_id"] for e in examples for _ in range(group_size)]
    rows = [run.stage.train_rows[r] for r in row_ids]
    scored = rewards.score(prompts, texts, completions, [{k: v for k, v in row.data.items() if k != "prompt"}
                                                         for row in rows], [row.location for row in rows])
    eos = tokenizer.eos_token_id
    return Rollout(prompts=prompts, prompt_ids=prompt_ids, completion_ids=completions, texts=texts, row_ids=row_ids,
                   scores=scored.total.to(device),
                   ended=torch.tensor([bool(c) and c[-1] == eos for c in completions], device=device),
                   group_size=group_size, sources=scored.raw, generator_logps=generated.logprobs)


def rows_of(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The batch restricted to ``rows``, keeping its width and per-token window (``window_start``), so
    that per-token values of the rows line up with those computed for the whole batch."""
    sub = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    sub["window_start"] = token_window_start(batch)
    return sub


def write_samples(run: RunState, step: int, columns: dict[str, list[Any]], num_samples: int) -> None:
    """Write a rollout's rows to ``samples/rollout-step-N.jsonl`` and print the first few as a table."""
    if not run.is_main_process:
        return
    names = list(columns)
    rows = list(zip(*columns.values(), strict=True))
    write_sample_file(run.stage_dir, f"rollout-step-{step}.jsonl", [dict(zip(names, row, strict=True)) for row in rows])
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stage '{run.stage.name}' step {step}: rollout samples")
    for name, value in zip(names, rows[0] if rows else names, strict=True):
        table.add_column(name, justify="right" if isinstance(value, float) else "left")
    for row in rows[:num_samples]:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    Console(file=sys.stdout).print(table)
