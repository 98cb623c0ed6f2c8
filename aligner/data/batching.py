"""Length-grouped batches and collation into padded tensors.

Preference batches put every chosen sequence first and every rejected one second, so one forward
pass covers both (``SequenceLogProbs.pairs`` splits them again).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from aligner.data.packing import PACK_KEY, check_packing
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED


class LengthGroupedBatches:
    """Batches of example indices, grouped by length to keep padding low.

    Each epoch the indices are shuffled, cut into windows of ``batch_size * window_batches``, sorted
    by length inside a window and cut into batches; the batches are shuffled again, so training
    sees a random order of batches whose members have similar lengths.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool = True,
                 group_by_length: bool = True, window_batches: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.window = batch_size * window_batches
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the order of ``epoch`` (different per epoch, the same on every rerun).

        ``skip`` leaves out the epoch's first batches: a resumed run continues where it stopped.
        """
        self.epoch = epoch
        self.skip = skip

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch."""
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            windows = [order[i:i + self.window] for i in range(0, len(order), self.window)]
            order = [i for w in windows for i in sorted(w, key=lambda j: self.lengths[j])]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.skip:])

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate(examples: list[dict[str, Any]], data_format: str, pad_token_id: int,
            share_prompt: bool = False, packing: bool | int = False) -> dict[str, Any]:
    """Pad a list of tokenized examples into a batch (right padding).

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on tokens the loss scores),
    ``prompt_lengths``, ``row_ids``, and ``labels`` for unpaired data. ``share_prompt`` (preference
    data only) marks the batch as one the log-prob code may run with each pair's prompt once
    (``aligner.modeling.shared_prompt``); ``packing`` (SFT data only: ``data.packing``) as one whose rows it may
    run concatenated (``aligner.data.packing``). The tensors are the same either way.
    """
    if data_format == PREFERENCE:
        fields = ["chosen_ids", "rejected_ids"]
    elif data_format == PROMPT_ONLY:
        fields = []
    else:
        fields = ["completion_ids"]
    sequences, masks, prompt_lengths = [], [], []
    for f in fields or [None]:
        for e in examples:
            completion = e[f] if f else []
            sequences.append(e["prompt_ids"] + completion)
            masks.append([0] * len(e["prompt_ids"]) + [1] * len(completion))
            prompt_lengths.append(len(e["prompt_ids"]))
    input_ids = _pad(sequences, pad_token_id)
    attention_mask = _pad([[1] * len(s) for s in sequences], 0)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": _pad(masks, 0),
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
        "row_ids": torch.tensor([e["row_id"] for e in examples], dtype=torch.long),
    }
    if share_prompt and data_format == PREFERENCE:
        batch["share_prompt"] = True
    if packing is not False and data_format == SFT:
        batch[PACK_KEY] = packing
    if data_format == UNPAIRED:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
    if any("margin" in e for e in examples):
        # Rows without a margin (in a file where others have one) count as margin 0.
        batch["margin"] = torch.tensor([e.get("margin", 0.0) for e in examples], dtype=torch.float32)
    return batch


def stage_collate(stage: Any, pad_token_id: int) -> partial:
    """The collate function of ``stage``'s batches (training, evaluation and reference passes alike).

    Refuses ``data.packing`` on a stage that does not train on SFT rows (``check_packing``).
    """
    check_packing(stage)
    return partial(collate, data_format=stage.data_format, pad_token_id=pad_token_id,
                   share_prompt=stage.config.train.share_prompt, packing=stage.config.data.packing)


def stage_lengths(stage: Any, data: Any) -> list[int]:
    """Length-grouping keys of ``data`` as ``stage`` batches it (with shared prompts or not)."""
    return data.lengths(shared_prompt=stage.config.train.share_prompt)
