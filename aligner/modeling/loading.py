"""Loading tokenizers and causal language models: from a directory, a hub id, or a tiny spec."""

from __future__ import annotations

import logging
from typing import Any

import torch

from aligner.config import ModelConfig, RunConfig, TinyModelConfig, TrainConfig
from aligner.errors import ConfigError
from aligner.training.distributed import launch_is_main_process

log = logging.getLogger("aligner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``model.dtype``; ``auto`` is bfloat16 on a CUDA GPU that has it, float32 otherwise.

    float32 on CPU because CPU bfloat16 matrix products are slower than float32 ones on most CPUs
    and lose precision for nothing; on a bf16 GPU half the memory and the fast kernels are the point.
    """
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_attn_implementation(config: ModelConfig, dtype: torch.dtype) -> None:
    """Refuse an attention implementation this machine cannot run, before the model loads.

    transformers' own errors for these come late (at the first forward) or name a package without the
    key; this names ``model.attn_implementation`` and what to change.
    """
    import importlib.util

    choice = config.attn_implementation
    if choice == "flash_attention_2":
        if not torch.cuda.is_available():
            raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and none is available "
                              "here; use sdpa (or leave the key out)")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
                              "not installed: pip install flash-attn --no-build-isolation (or use sdpa)")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"model.attn_implementation: flash_attention_2 runs in bfloat16 or float16, but "
                              f"model.dtype gives {str(dtype).removeprefix('torch.')}; set model.dtype: auto or "
                              "bfloat16")


def _attention_kwargs(config: ModelConfig) -> dict[str, Any]:
    """``attn_implementation`` for transformers, only when set: unset keeps transformers' per-model default."""
    return {} if config.attn_implementation is None else {"attn_implementation": config.attn_implementation}


def load_tokenizer(config: RunConfig) -> Any:
    """The run's tokenizer: ``builtin``, the one at ``tokenizer``, or the model's own.

    A tokenizer without a pad token gets its EOS token for padding (padding is always masked out
    of attention and loss), and the log says so.
    """
    source = config.tokenizer or ("builtin" if config.model.tiny else config.model.path)
    if source == "builtin":
        from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

        tokenizer = load_builtin_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            # transformers raises ValueError for a folder without tokenizer files ("Couldn't instantiate
            # the backend tokenizer"), OSError for a missing one.
            raise ConfigError(f"could not load the tokenizer from '{source}' (tokenizer / model.path): {exc}") from None
    return prepare_tokenizer(tokenizer, f"the tokenizer from '{source}'")


def prepare_tokenizer(tokenizer: Any, what: str = "the tokenizer") -> Any:
    """Make a tokenizer ready for training: right padding, and the EOS token for padding when it has
    no pad token (padding is always masked out of attention and loss; the log says so)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{what} has neither a pad nor an EOS token; set one")
        tokenizer.pad_token = tokenizer.eos_token
        log.warning("tokenizer has no pad token; padding with the EOS token %r (padding is masked out)",
                    tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def _tiny_llama_config(spec: TinyModelConfig, tokenizer: Any, **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **extra,
    )


def build_tiny_model(spec: TinyModelConfig, tokenizer: Any, dtype: torch.dtype,
                     attn_implementation: str | None = None) -> torch.nn.Module:
    """A randomly initialised Llama-style causal LM of the given size (seeded by the caller)."""
    from transformers import LlamaForCausalLM

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return LlamaForCausalLM(_tiny_llama_config(spec, tokenizer, **extra)).to(dtype)


def build_tiny_reward_model(spec: TinyModelConfig, tokenizer: Any, dtype: torch.dtype,
                            attn_implementation: str | None = None) -> torch.nn.Module:
    """A randomly initialised Llama-style model with a one-output score head (seeded by the caller)."""
    from transformers import LlamaForSequenceClassification

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return LlamaForSequenceClassification(_tiny_llama_config(spec, tokenizer, num_labels=1, **extra)).to(dtype)


def _from_pretrained(auto_class: Any, config: ModelConfig, dtype: torch.dtype, what: str, **extra: Any) -> Any:
    try:
        return auto_class.from_pretrained(config.path, revision=config.revision,
                                          trust_remote_code=config.trust_remote_code, dtype=dtype,
                                          **_attention_kwargs(config), **extra)
    except (OSError, ValueError) as exc:
        if config.attn_implementation is not None and "attn" in str(exc).lower():
            # e.g. an architecture without sdpa or flex support: the key to change, not the loader's wording
            raise ConfigError(f"model.attn_implementation: {config.attn_implementation} does not work for "
                              f"'{config.path}': {exc}") from None
        raise ConfigError(f"could not load {what} from '{config.path}' (model.path): {exc}") from None


def _model_dtype(config: ModelConfig) -> torch.dtype:
    """The resolved ``model.dtype``, after checking the attention implementation can run in it."""
    dtype = resolve_dtype(config.dtype)
    check_attn_implementation(config, dtype)
    if config.dtype == "auto" and launch_is_main_process():  # once per run, not once per process
        log.info("model dtype: %s (model.dtype: auto)", str(dtype).removeprefix("torch."))
    return dtype


def load_causal_lm(config: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    """The causal LM to train, in the configured dtype and attention implementation."""
    dtype = _model_dtype(config)
    if config.tiny is not None:
        return build_tiny_model(config.tiny, tokenizer, dtype, config.attn_implementation)
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, config, dtype, "a causal LM")
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def load_reward_model(config: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    """A sequence-classification model with one label: any causal LM's body plus a fresh score head.

    Loading a causal-LM checkpoint (e.g. an SFT stage's output) keeps its body and initialises the
    head; a reward-model checkpoint loads whole. ``pad_token_id`` is set from the tokenizer, since the
    model scores the last non-padding token of each sequence.
    """
    dtype = _model_dtype(config)
    if config.tiny is not None:
        return build_tiny_reward_model(config.tiny, tokenizer, dtype, config.attn_implementation)
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification, config, dtype, "a reward model", num_labels=1)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def adopt_model(model: torch.nn.Module, tokenizer: Any, forward_kind: str = "logprobs") -> torch.nn.Module:
    """A model object handed to the Python API (``aligner.train(..., model=...)``), checked to have the
    head the stages need and made to fit the tokenizer as a loaded one would be; it trains in place."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"model= must be a transformers PreTrainedModel, got {type(model).__name__}")
    if forward_kind == "reward":
        if not type(model).__name__.endswith("ForSequenceClassification") or model.config.num_labels != 1:
            raise ConfigError(f"model= is a {type(model).__name__}; the run's losses train a reward model: pass a "
                              "sequence-classification model with num_labels=1")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    elif model.get_output_embeddings() is None:
        raise ConfigError(f"model= is a {type(model).__name__} without a language-model head; the run's losses "
                          "need a causal LM (e.g. AutoModelForCausalLM)")
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def object_label(obj: Any) -> str:
    """How the run's config names a model or tokenizer object passed to the API: where it was loaded
    from when it says (``name_or_path``), else ``<in-memory CLASS>``."""
    name = getattr(obj, "name_or_path", "") or ""
    return name if name else f"<in-memory {type(obj).__name__}>"


# forward kind of a run's losses -> the model class that kind needs (see aligner.training.micro_batch.FORWARDS)
MODEL_LOADERS = {"logprobs": load_causal_lm, "reward": load_reward_model}


def load_model(config: ModelConfig, tokenizer: Any, forward_kind: str = "logprobs") -> torch.nn.Module:
    """The model to train, in the configured dtype, with the head the stages' losses need."""
    return MODEL_LOADERS[forward_kind](config, tokenizer)


def _transformers_model(model: torch.nn.Module) -> Any:
    """The outermost transformers model in ``model`` (itself, or the one inside a peft or accelerate wrapper)."""
    from transformers import PreTrainedModel

    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} contains no transformers model to switch checkpointing on")
    return found


def apply_training_switches(model: torch.nn.Module, train: TrainConfig) -> None:
    """Apply a stage's ``train`` switches that change how ``model`` computes (not what): call it once per
    stage, after the PEFT backend wrapped the model and before ``accelerator.prepare``."""
    # On a CPU run the saved inputs are in host memory already (and torch has no pinned allocator
    # without an accelerator): offloading is skipped, and the log says so.
    offload = train.activation_offload and torch.accelerator.is_available()
    set_gradient_checkpointing(model, train.gradient_checkpointing, offload=offload)
    if train.gradient_checkpointing and launch_is_main_process():  # once per stage, not per process
        note = {(True, True): ", inputs offloaded to CPU", (True, False): "; activation_offload: nothing to offload "
                "without an accelerator"}.get((train.activation_offload, offload), "")
        log.info("gradient checkpointing: on (non-reentrant%s)", note)


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool, offload: bool = False) -> None:
    """Switch gradient (activation) checkpointing of ``model``'s decoder layers on or off, for a stage.

    Call it after the PEFT backend wrapped the model: LoRA leaves the embeddings frozen, and
    transformers then makes the embedding output require grad so gradients reach the adapters in
    checkpointed layers. Non-reentrant checkpointing (``use_reentrant=False``): the variant torch
    recommends, which handles inputs that need no grad, keyword arguments and ``no_grad`` passes
    (reference log-probs) correctly. Off is applied too, since one model runs through every stage.
    Checkpointing acts only in training mode with gradients: evaluation, sampling (``model.eval()``) and
    ``no_grad`` passes are unchanged. ``offload`` keeps the inputs each checkpointed layer saves in
    pinned CPU memory (transformers' ``save_on_cpu``); on a CPU-only run they are there already.
    """
    inner = _transformers_model(model)
    if enabled:
        if not inner.supports_gradient_checkpointing:
            raise ConfigError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it")
        if hasattr(inner, "activation_checkpointing_enable"):
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                  offload=offload)
        else:  # transformers before the activation_checkpointing_* names (no offload there)
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(inner, "activation_checkpointing_enable"):
        if inner.is_activation_checkpointing:
            inner.activation_checkpointing_disable()
            _drop_input_require_grads(inner)
    elif inner.is_gradient_checkpointing:
        inner.gradient_checkpointing_disable()
        _drop_input_require_grads(inner)


def _drop_input_require_grads(inner: torch.nn.Module) -> None:
    # transformers drops its embedding-output hook on disable only for peft's own adapters
    if getattr(inner, "_require_grads_hooks", None):
        inner.disable_input_require_grads()


def pick_device(requested: str | None = None) -> torch.device:
    """``requested``, or the GPU when there is one, else the CPU: where a model outside the training
    loop (a judge's, ``aligner label``'s, ``aligner generate``'s) runs."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
