"""``cached``: reference log-probs computed once, before training, and kept in a disk cache.

At setup the reference model (the policy before any update; with a PEFT backend its base model,
adapters disabled) scores every train and eval sequence of the stage once, with a progress bar,
and the values go to a content-addressed cache (``aligner.cache``). During training and evaluation
the reference "pass" is a table lookup by sequence fingerprint: no reference model in memory, no
reference forward pass. A second run on the same model and data (a sweep over beta, a rerun)
finds the entries and does no reference forward pass at all.

The cache key covers: a SHA-256 of the reference weights' bytes (names, dtypes, shapes, values),
the token ids of every sequence (so template, truncation and max length are covered), the
completion boundaries, the model and autocast dtypes, and the log-prob code's version.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any

import torch
from accelerate import PartialState
from pydantic import Field

from aligner.cache import CorruptEntry, Entry, ReferenceCache
from aligner.hookspecs import hookimpl
from aligner.protocols import Options, ReferenceContext, Requires, SequenceLogProbs
from aligner.references.disabled_adapter import peft_model_of
from aligner.tracking import Progress

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
    own length leaves almost no padding. ``None`` where this does not apply.
    """
    from aligner.data.batching import LengthGroupedBatches, collate
    from aligner.protocols import PREFERENCE

    pad = getattr(context.collate_fn, "keywords", {}).get("pad_token_id")
    if data.data_format != PREFERENCE or pad is None:
        return None
    sequences = [{"prompt_ids": e["prompt_ids"], "completion_ids": e[field], "row_id": e["row_id"]}
                 for field in ("chosen_ids", "rejected_ids") for e in data.examples]

    def batches(size: int) -> list[dict[str, Any]]:
        lengths = [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in sequences]
        order = LengthGroupedBatches(lengths, size, seed=0, shuffle=False, window_batches=len(sequences))
        return [collate([sequences[i] for i in indices], data_format="sft", pad_token_id=pad) for indices in order]

    return batches


class CachedReference:
    """Reference values from the on-disk cache, computed at setup where missing."""

    name = "cached"
    # Values exist only for the dataset's own sequences: a loss that scores sequences made during
    # training (KTO's mismatched pairs) would find none at its first batch, so it is refused up front.
    requires = (Requires("losses", "needs_kl_completions", value=False, default=False,
                         what="scores only the dataset's own sequences (it has values for no others)",
                         hint="use reference 'auto', which picks 'frozen_copy' or 'disabled_adapter' for such a loss"),)

    class Options(Options):
        """Where the cache lives and how to fill it."""

        dir: str | None = Field(None, description="cache directory; default $ALIGNER_CACHE_DIR/reference or "
                                                  "~/.cache/aligner/reference")
        batch_size: int | None = Field(None, gt=0, description="batch size for filling it; default: the stage's")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.cache = ReferenceCache(self.options.dir)
        self.table: dict[int, tuple[float, int]] = {}
        self.forward_passes = 0  # reference forward passes this run (0 on a full cache hit)
        self.keys: dict[str, str] = {}

    # -- setup: look up or compute every split ------------------------------------------------------
    def setup(self, context: ReferenceContext) -> None:
        """Load or compute the reference values of every train and eval sequence of the stage."""
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
            batches = self._batches(data, batch_size, context)
            fingerprints = [f for batch in batches for f in sequence_fingerprints(batch)]
            key = self._key(model_key, dtype, context, fingerprints)
            self.keys[split] = key
            # With several processes the main one computes and writes the entry while the others
            # wait, then they read it: one reference pass per run, not one per process.
            with PartialState().main_process_first():
                entry = self._load(key)
                if entry is None:
                    entry = self._compute(key, batches, fingerprints, context, stage, split, model_key)
                else:
                    log.info("stage '%s' %s: reference log-probs from the cache (%s...)", stage.name, split, key[:12])
            self._add(entry)

    def _batches(self, data: Any, batch_size: int, context: ReferenceContext) -> list[dict[str, Any]]:
        from aligner.data.batching import LengthGroupedBatches
        from aligner.logprobs import can_share_prompts
        from aligner.protocols import PREFERENCE

        # Pairs whose prompt runs once are the cheapest layout; where the model cannot run them,
        # single sequences sorted by their own length pad least.
        shared = (data.data_format == PREFERENCE and getattr(context.collate_fn, "keywords", {}).get("share_prompt")
                  and can_share_prompts(context.policy))
        single = None if shared else _single_sequences(data, context)
        if single is not None:
            return single(2 * batch_size)
        # Sorted by length over the whole split (no shuffling here), so batches pad as little as possible.
        order = LengthGroupedBatches(data.lengths(shared_prompt=bool(shared)), batch_size, seed=0, shuffle=False,
                                     window_batches=len(data.examples))
        return [context.collate_fn([data.examples[i] for i in indices]) for indices in order]

    @staticmethod
    def _key(model_key: str, dtype: str, context: ReferenceContext, fingerprints: list[int]) -> str:
        digest = hashlib.sha256()
        precision = getattr(context.autocast, "__self__", None)
        precision = getattr(precision, "mixed_precision", "no")
        digest.update(f"{LOGPROBS_VERSION};{model_key};{dtype};autocast={precision};".encode())
        digest.update(torch.tensor(sorted(fingerprints), dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def _load(self, key: str) -> Entry | None:
        try:
            return self.cache.load(key)
        except CorruptEntry as exc:
            log.warning("reference cache entry is corrupt and will be rebuilt: %s", exc)
            self.cache.remove(key)
            return None

    def _compute(self, key: str, batches: list[dict[str, Any]], fingerprints: list[int], context: ReferenceContext,
                 stage: Any, split: str, model_key: str) -> Entry:
        model = context.policy
        peft_model = peft_model_of(model)
        was_training = model.training
        # Deterministic values (no dropout); a 4-bit base is guarded against eval-mode repacking
        # by its PEFT backend (aligner.peft_backends.quantization).
        model.eval()
        # Setup runs before accelerate places the model, so batches go where its weights are now.
        device = next(model.parameters()).device
        logps, counts = [], []
        progress = Progress(f"{stage.name} reference log-probs ({split})", len(batches))
        try:
            with torch.no_grad():
                for done, batch in enumerate(batches, 1):
                    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    disabled = peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
                    autocast = context.autocast() if context.autocast is not None else contextlib.nullcontext()
                    with disabled, autocast:
                        result = context.logprobs_fn(model, moved)
                    self.forward_passes += 1
                    logps.append(result.logps.float().cpu())
                    counts.append(result.num_tokens.cpu())
                    progress.update(done)
        finally:
            progress.close()
            model.train(was_training)
        info = {"stage": stage.name, "split": split, "weights": model_key[:16], "sequences": len(fingerprints),
                "data": str(getattr(stage.config.data, split, "") or "")}
        path = self.cache.save(key, torch.tensor(fingerprints, dtype=torch.int64), torch.cat(logps),
                               torch.cat(counts), info)
        log.info("stage '%s' %s: cached reference log-probs of %d sequences in %s", stage.name, split,
                 len(fingerprints), path)
        return Entry(key, torch.tensor(fingerprints, dtype=torch.int64), torch.cat(logps), torch.cat(counts), {})

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
                    "stage's train/eval sequences at setup (a loss that scores extra sequences needs "
                    "reference 'frozen_copy' or 'disabled_adapter')")
            values.append(found[0])
        device = batch["input_ids"].device
        return SequenceLogProbs(torch.tensor(values, dtype=torch.float32, device=device),
                                batch["completion_mask"].sum(-1))


@hookimpl
def register_reference_policies(register):
    """Register ``cached``."""
    register(CachedReference)
