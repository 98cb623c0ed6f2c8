"""``cached``: reference log-probs computed before training and kept in a disk cache.

At setup the reference model (the policy before any update; with a PEFT backend its base model,
adapters disabled) scores the stage's sequences, with a progress bar, and the values go to a
content-addressed cache (``aligner.references.logprob_store``). During training and evaluation the reference "pass" is
a table lookup by sequence fingerprint: no reference model in memory, no reference forward pass. A
second run on the same model and data (a sweep over beta, a rerun) finds the entries and does no
reference forward pass at all.

What is scored (``fill``). Every sequence of a split is placed in one fixed *plan*: the split's
sequences sorted by length and cut into batches (little padding). With ``fill: used`` (the default)
only the plan's batches that hold a train row the run will draw are scored: the rows of the first
``max_steps`` (plus ``train.max_nonfinite_steps`` spare steps, for updates the non-finite guard
skips) steps of the same seeded, length-grouped batch order the offline algorithm trains in. A
short run of a large dataset so scores a small part of it, not the whole split. The values are
bit-identical to a full pass's: each scored batch is the very batch the full pass would run (same
rows, same padding). The entry of a split holds whatever has been scored so far; a later run that
needs more scores only the missing batches and adds them. The eval split, a resumed run and
algorithms other than ``offline`` are scored whole (``fill: all`` always is).

The cache key covers: a SHA-256 of the reference weights' bytes (names, dtypes, shapes, values),
the token ids of every sequence of the split (so template, truncation and max length are covered),
the completion boundaries, the plan (layout and batch size), the model and autocast dtypes, and the
log-prob code's version.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.protocols import Options, ReferenceContext, ReferenceNeeds, Requires, SequenceLogProbs
from aligner.references.disabled_adapter import peft_model_of
from aligner.references.logprob_store import CorruptEntry, Entry, ReferenceCache
from aligner.reporting.metrics import Progress

log = logging.getLogger("aligner")

# Bump when completion_logprobs changes what it computes, so old entries stop matching.
# (Not bumped for the shared-prompt layout: it computes the same values as two rows per pair.)
LOGPROBS_VERSION = "completion_logprobs-2"


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the reference weights: every state-dict tensor except the adapters' own."""
    peft_model = peft_model_of(model)
    adapters = set(getattr(peft_model, "peft_config", {}) or {})
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if adapters and adapters.intersection(name.split(".")):
            continue  # adapter weights are switched off for the reference
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(memoryview(t.view(torch.uint8).numpy()))
    return digest.hexdigest()


def sequence_fingerprints(batch: dict[str, Any]) -> list[int]:
    """A 64-bit fingerprint of each sequence of a batch: its unpadded token ids and completion start."""
    ids = batch["input_ids"].cpu()
    lengths = batch["attention_mask"].sum(-1).cpu().tolist()
    starts = batch["prompt_lengths"].cpu().tolist()
    out = []
    for row, length, start in zip(ids, lengths, starts, strict=True):
        h = hashlib.blake2b(row[:length].numpy().tobytes(), digest_size=8, person=b"aligner-ref")
        h.update(int(start).to_bytes(4, "little"))
        out.append(int.from_bytes(h.digest(), "little", signed=True))
    return out


def _single_sequences(data: Any, context: ReferenceContext):
    """For preference data: a builder of batches of single sequences sorted by their own length.

    Values are cached per sequence, so the reference pass need not keep a pair's chosen and rejected
    sequences in one batch (which pads the shorter one to the longer): sorting every sequence by its
    own length leaves almost no padding. ``None`` where this does not apply. Each batch comes with
    the indices of the examples its sequences belong to.
    """
    from aligner.data.batching import LengthGroupedBatches, collate
    from aligner.protocols import PREFERENCE

    pad = context.pad_token_id
    if data.data_format != PREFERENCE or pad is None:
        return None
    sequences = [{"prompt_ids": e["prompt_ids"], "completion_ids": e[field], "row_id": e["row_id"]}
                 for field in ("chosen_ids", "rejected_ids") for e in data.examples]
    count = len(data.examples)

    def batches(size: int) -> list[tuple[dict[str, Any], list[int]]]:
        lengths = [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in sequences]
        order = LengthGroupedBatches(lengths, size, seed=0, shuffle=False, window_batches=len(sequences))
        # Sequence i is the chosen (i < count) or rejected completion of example i % count.
        return [(collate([sequences[i] for i in indices], data_format="sft", pad_token_id=pad),
                 [i % count for i in indices]) for indices in order]

    return batches


def used_examples(stage: Any, data: Any, context: ReferenceContext, spare_steps: int) -> set[int] | None:
    """Indices of the train examples a fresh run of the offline algorithm draws; ``None``: all of them.

    The batches are the offline algorithm's own (``aligner.algorithms.offline``): length-grouped with
    the stage's seed, ``gradient_accumulation_steps`` micro-batches per step on each process, every
    process taking every n-th batch of one global order. ``spare_steps`` more steps are covered for
    steps the non-finite guard skips (their batches are used up but the step does not count).
    """
    from aligner.data.batching import LengthGroupedBatches, stage_lengths

    train = stage.config.train
    if getattr(stage.algorithm, "name", None) != "offline":
        return None  # another algorithm's batch order is its own: score everything
    processes = PartialState().num_processes
    sampler = LengthGroupedBatches(stage_lengths(stage, data), train.batch_size, seed=_stage_seed(context),
                                   group_by_length=train.group_by_length)
    per_step = train.gradient_accumulation_steps * processes
    steps = train.max_steps or math.ceil(train.epochs * -(-len(sampler) // per_step))
    drawn = (steps + spare_steps) * per_step
    if drawn >= len(sampler):
        return None  # the run reaches the end of the first epoch: every row
    sampler.set_epoch(0)
    return {i for batch in sampler.batches()[:drawn] for i in batch}


def _stage_seed(context: ReferenceContext) -> int:
    """The seed of the stage's data order: the run's seed + the stage's index.

    ``ReferenceContext`` does not carry it; the trainer seeds every stage with exactly that
    (``set_seed(config.seed + stage.index)`` in ``aligner.api``) just before its setup, and nothing
    reseeds torch in between. Were that to change, the first lookup would find no value and stop the
    run at its first step with an error naming ``fill: all``, never train on wrong values.
    """
    return torch.initial_seed()


def _resuming(context: ReferenceContext) -> bool:
    """Whether the stage already has checkpoints: a resumed run continues from one, at a data position
    this setup does not see, so its rows cannot be told in advance."""
    if not context.run_dir or context.stage is None:
        return False
    checkpoints = Path(context.run_dir) / context.stage.name / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


class CachedReference:
    """Reference values from the on-disk cache, computed at setup where missing."""

    name = "cached"
    # Values exist only for the dataset's own sequences: a loss that scores sequences made during
    # training (KTO's mismatched pairs) would find none at its first batch, so it is refused up front.
    requires = (Requires("losses", "needs_kl_completions", value=False, default=False,
                         what="scores only the dataset's own sequences (it has values for no others)",
                         hint="use reference 'auto', which picks 'frozen_copy' or 'disabled_adapter' for such a loss"),)
    # ``reference: auto``'s first choice for offline data: every value computed once, before training,
    # and reused by later runs on the same model and data.
    auto_priority = 30

    @classmethod
    def usable_for(cls, needs: ReferenceNeeds) -> bool:
        """When every sequence the stage scores is in its dataset (not online samples, not KTO's pairs)."""
        return needs.needs_reference and needs.offline

    class Options(Options):
        """Where the cache lives and how to fill it."""

        dir: str | None = Field(None, description="cache directory; default $ALIGNER_CACHE_DIR/reference or "
                                                  "~/.cache/aligner/reference")
        batch_size: int | None = Field(None, gt=0, description="batch size for filling it; default: the stage's")
        fill: Literal["used", "all"] = Field("used", description=(
            "used: score only the train rows the run will draw (a short run of a large dataset does not wait "
            "for a whole pass; later runs add what they need); all: score every train and eval row at setup"))

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.cache = ReferenceCache(self.options.dir)
        self.table: dict[int, tuple[float, int]] = {}
        self.forward_passes = 0  # reference forward passes this run (0 on a full cache hit)
        self.keys: dict[str, str] = {}
        # Per split, the row ids whose sequences this run scored (a forward pass, not a cache hit).
        self.scored_rows: dict[str, set[int]] = {}

    # -- setup: look up or compute every split ------------------------------------------------------
    def setup(self, context: ReferenceContext) -> None:
        """Load the reference values of the stage's sequences from the cache; score those missing."""
        stage = context.stage
        if stage is None or context.collate_fn is None:
            raise RuntimeError("reference 'cached' needs the stage's tokenized data in its ReferenceContext")
        model = context.policy
        model_key = weights_digest(model)
        dtype = str(next(model.parameters()).dtype)
        for split in ("train", "eval"):
            data = getattr(stage, f"{split}_data", None)
            if data is None or not data.examples:
                continue
            batch_size = self.options.batch_size or (stage.config.train.batch_size if split == "train"
                                                     else stage.config.eval.batch_size)
            layout, plan = self._plan(data, batch_size, context)
            per_batch = [sequence_fingerprints(batch) for batch, _ in plan]
            fingerprints = [f for batch in per_batch for f in batch]
            key = self._key(model_key, dtype, context, fingerprints, f"{layout}:{batch_size}")
            self.keys[split] = key
            needed = None
            if split == "train" and self.options.fill == "used" and not _resuming(context):
                needed = used_examples(stage, data, context, stage.config.train.max_nonfinite_steps)
            # With several processes the main one computes and writes the entry while the others
            # wait, then they read it: one reference pass per run, not one per process.
            with PartialState().main_process_first():
                entry = self._load(key)
                have = set(entry.fingerprints.tolist()) if entry is not None else set()
                todo = [i for i, (_, members) in enumerate(plan)
                        if (needed is None or needed.intersection(members)) and not have.issuperset(per_batch[i])]
                if todo:
                    entry = self._compute(key, plan, per_batch, todo, entry, context, stage, split, model_key,
                                          len(data.examples) if needed is None else len(needed), len(fingerprints))
                else:
                    log.info("stage '%s' %s: reference log-probs from the cache (%s...)", stage.name, split, key[:12])
            self._add(entry)

    def _plan(self, data: Any, batch_size: int,
              context: ReferenceContext) -> tuple[str, list[tuple[dict[str, Any], list[int]]]]:
        """The split's fixed batches (each with its examples' indices) and the layout's name."""
        from aligner.data.batching import LengthGroupedBatches
        from aligner.modeling.logprobs import can_share_prompts
        from aligner.protocols import PREFERENCE

        # Pairs whose prompt runs once are the cheapest layout; where the model cannot run them,
        # single sequences sorted by their own length pad least.
        shared = (data.data_format == PREFERENCE and context.share_prompt
                  and can_share_prompts(context.policy))
        single = None if shared else _single_sequences(data, context)
        if single is not None:
            return "single", single(2 * batch_size)
        # Sorted by length over the whole split (no shuffling here), so batches pad as little as possible.
        order = LengthGroupedBatches(data.lengths(shared_prompt=bool(shared)), batch_size, seed=0, shuffle=False,
                                     window_batches=len(data.examples))
        layout = "shared" if shared else "rows"
        return layout, [(context.collate_fn([data.examples[i] for i in indices]), list(indices)) for indices in order]

    @staticmethod
    def _key(model_key: str, dtype: str, context: ReferenceContext, fingerprints: list[int], plan: str) -> str:
        digest = hashlib.sha256()
        precision = getattr(context.autocast, "__self__", None)
        precision = getattr(precision, "mixed_precision", "no")
        # The plan is in the key because an entry can be filled by several runs: every value in it must
        # come from the same batches (padding changes the last bits), whichever run scored it.
        digest.update(f"{LOGPROBS_VERSION};{model_key};{dtype};autocast={precision};plan={plan};".encode())
        digest.update(torch.tensor(sorted(fingerprints), dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def _load(self, key: str) -> Entry | None:
        try:
            return self.cache.load(key)
        except CorruptEntry as exc:
            log.warning("reference cache entry is corrupt and will be rebuilt: %s", exc)
            self.cache.remove(key)
            return None

    def _compute(self, key: str, plan: list[tuple[dict[str, Any], list[int]]], per_batch: list[list[int]],
                 todo: list[int], entry: Entry | None, context: ReferenceContext, stage: Any, split: str,
                 model_key: str, rows: int, total: int) -> Entry:
        """Score the plan's batches ``todo``, add them to ``entry`` (what the cache held) and save it."""
        model = context.policy
        peft_model = peft_model_of(model)
        was_training = model.training
        sequences = sum(len(per_batch[i]) for i in todo)
        examples = len(getattr(stage, f"{split}_data").examples)
        why = (f"the batches holding the {rows} of {examples} rows the run's steps draw (with "
               f"train.max_nonfinite_steps={stage.config.train.max_nonfinite_steps} spare steps)"
               if rows < examples else f"all {examples} rows")
        log.info("stage '%s' %s: scoring reference log-probs of %d of the split's %d sequences in %d batches: %s",
                 stage.name, split, sequences, total, len(todo), why)
        # Deterministic values (no dropout); a 4-bit base is guarded against eval-mode repacking
        # by its PEFT backend (aligner.peft_backends.quantization).
        model.eval()
        # Setup runs before accelerate places the model, so batches go where its weights are now.
        device = next(model.parameters()).device
        logps, counts, scored = [], [], self.scored_rows.setdefault(split, set())
        progress = Progress(f"{stage.name} reference log-probs ({split})", len(todo))
        try:
            with torch.no_grad():
                for done, index in enumerate(todo, 1):
                    started = time.perf_counter()
                    batch = plan[index][0]
                    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    disabled = peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
                    autocast = context.autocast() if context.autocast is not None else contextlib.nullcontext()
                    with disabled, autocast:
                        result = context.logprobs_fn(model, moved)
                    self.forward_passes += 1
                    scored.update(batch["row_ids"].tolist())
                    logps.append(result.logps.float().cpu())
                    counts.append(result.num_tokens.cpu())
                    if done == 1 and len(todo) > 1:
                        seconds = (time.perf_counter() - started) * len(todo)
                        log.info("stage '%s' %s: the reference pass will take about %s (from its first batch)",
                                 stage.name, split, _duration(seconds))
                    progress.update(done)
        finally:
            progress.close()
            model.train(was_training)
        new = torch.tensor([f for i in todo for f in per_batch[i]], dtype=torch.int64)
        parts = [entry] if entry is not None else []
        fingerprints = torch.cat([e.fingerprints for e in parts] + [new])
        values = torch.cat([e.logps for e in parts] + logps)
        tokens = torch.cat([e.num_tokens for e in parts] + counts)
        info = {"stage": stage.name, "split": split, "weights": model_key[:16], "sequences": int(fingerprints.numel()),
                "of": total, "data": str(getattr(stage.config.data, split, "") or "")}
        path = self.cache.save(key, fingerprints, values, tokens, info)
        log.info("stage '%s' %s: cached reference log-probs of %d sequences in %s (%d of %d sequences of the "
                 "split now cached)", stage.name, split, sequences, path, fingerprints.numel(), total)
        return Entry(key, fingerprints, values, tokens, {})

    def _add(self, entry: Entry) -> None:
        for fingerprint, value, count in zip(entry.fingerprints.tolist(), entry.logps.tolist(),
                                             entry.num_tokens.tolist(), strict=True):
            self.table[fingerprint] = (value, count)

    # -- lookups during training and evaluation ----------------------------------------------------
    def logprobs(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """The cached reference values of the batch's sequences (no forward pass)."""
        values = []
        for fingerprint in sequence_fingerprints(batch):
            found = self.table.get(fingerprint)
            if found is None:
                raise RuntimeError(
                    "reference 'cached' has no value for a sequence of this batch: it was not among the "
                    "sequences scored at setup (a loss that scores extra sequences needs reference "
                    "'frozen_copy' or 'disabled_adapter'; a run that drew more batches than its steps, as "
                    "when many steps were skipped for non-finite values, needs reference option 'fill: all')")
            values.append(found[0])
        device = batch["input_ids"].device
        return SequenceLogProbs(torch.tensor(values, dtype=torch.float32, device=device),
                                batch["completion_mask"].sum(-1))


def _duration(seconds: float) -> str:
    """``under a second``, ``42s``, ``3.5 min`` or ``1.2 h``."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@hookimpl
def register_reference_policies(register):
    """Register ``cached``."""
    register(CachedReference)
