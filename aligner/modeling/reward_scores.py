"""Scalar scores from a sequence-classification model (``num_labels=1``): the reward forward.

The model scores each sequence at its last non-padding token (transformers finds it from
``config.pad_token_id``), so the batch must be right-padded with the tokenizer's pad token, as
``collate`` does. A preference batch collated with ``share_prompt`` runs each pair as one row that
holds its prompt once (``aligner.modeling.shared_prompt``) when the model is a plain decoder + score head;
the score is read at the same token as the model's own forward would read it.
"""

from __future__ import annotations

from typing import Any

import torch

from aligner.modeling.ddp_forward import ddp_inner, run_as_forward
from aligner.modeling.plain_head import plain_head_model
from aligner.modeling.shared_prompt import pack_pairs


def decoder_and_score(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, int] | None:
    """The decoder, the score head and the pad token id to call separately, or ``None``.

    ``None`` for wrappers whose forward must run (DDP and friends), prompt-learning PEFT methods,
    model types not known to be ``score(decoder(...))``, and models without a pad token.
    """
    model = plain_head_model(model)
    if model is None:
        return None
    config = model.config
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    score = getattr(model, "score", None)
    pad = config.get_text_config().pad_token_id if hasattr(config, "get_text_config") else config.pad_token_id
    if not isinstance(decoder, torch.nn.Module) or not isinstance(score, torch.nn.Module) or pad is None:
        return None
    return decoder, score, int(pad)


def _decoder_scores(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Scores through the decoder and score head called directly (``decoder_and_score`` is not None).

    Pairs of a ``share_prompt`` batch run packed where they can, else every sequence is its own row;
    either way the score is read where the model's own forward reads it.
    """
    decoder, score, pad = decoder_and_score(model)
    packed = pack_pairs(batch, decoder) if batch.get("share_prompt") else None
    ids = batch["input_ids"]
    if packed is None:
        hidden = decoder(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    else:
        hidden = packed.hidden_states(decoder)  # a dense mask, or segment by segment without one
    # The model's own rule: the rightmost token that is not the pad token, found in the two-row layout.
    columns = torch.arange(ids.shape[1], device=ids.device)
    last = (columns * (ids != pad)).argmax(-1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    flat = rows * ids.shape[1] + last if packed is None else packed.flat_index(rows, last)
    return score(hidden.flatten(0, 1)[flat])


def sequence_scores(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """One score per sequence of the batch, shape ``[N]``."""
    inner = ddp_inner(model)
    if not batch.get("share_prompt") or decoder_and_score(inner if inner is not None else model) is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    elif inner is None:
        logits = _decoder_scores(model, batch)
    else:  # run as DDP's forward, so gradients still sync
        logits = run_as_forward(model, lambda: _decoder_scores(inner, batch))
    if logits.shape[-1] != 1:
        raise ValueError(f"a reward model must have one output label, this one has {logits.shape[-1]}")
    return logits.squeeze(-1)
