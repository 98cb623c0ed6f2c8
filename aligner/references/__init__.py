"""Built-in reference policies, and the choice of one when a stage says ``reference: auto``."""

from __future__ import annotations

from aligner.protocols import PROMPT_ONLY


def choose_reference(requested: str, needs_reference: bool, data_format: str | None = None,
                     peft_name: str | None = None, scores_extra_sequences: bool = False,
                     peft_adds_adapters: bool | None = None) -> str:
    """Resolve ``auto`` to the fastest correct reference for the stage.

    - no loss needs a reference: ``none`` (no reference pass at all);
    - offline data (the completions are in the dataset): ``cached``, every value computed once,
      before training, and reused by later runs on the same model and data;
    - online data (prompts only; completions are generated during training, so they cannot be
      precomputed), or a loss that scores sequences made during training (KTO's mismatched
      prompt/completion pairs, ``scores_extra_sequences``): on the fly, from the base model with adapters
      off when the PEFT backend adds adapters (no second copy), else from a frozen copy.

    ``peft_adds_adapters`` is the backend's ``adds_adapters`` declaration; when it is not known
    (``None``) any backend but ``full`` is taken to add adapters, as before the declaration existed.
    """
    if requested != "auto":
        return requested
    if not needs_reference:
        return "none"
    if data_format != PROMPT_ONLY and not scores_extra_sequences:
        return "cached"
    adapters = peft_adds_adapters if peft_adds_adapters is not None else peft_name not in (None, "full")
    return "disabled_adapter" if adapters else "frozen_copy"
