"""Loading tokenizers and causal language models: from a directory, a hub id, or a tiny spec."""

from __future__ import annotations

import logging
from typing import Any

import torch

from aligner.config import ModelConfig, RunConfig, TinyModelConfig
from aligner.errors import ConfigError

log = logging.getLogger("aligner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(config: RunConfig) -> Any:
    """The run's tokenizer: ``builtin``, the one at ``tokenizer``, or the model's own.

    A tokenizer without a pad token gets its EOS token for padding (padding is always masked out
    of attention and loss), and the log says so.
    """
    source = config.tokenizer or ("builtin" if config.model.tiny else config.model.path)
    if source == "builtin":
        from aligner.tiny_tokenizer import load_builtin_tokenizer

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
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer from '{source}' has neither a pad nor an EOS token; set one")
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


def build_tiny_model(spec: TinyModelConfig, tokenizer: Any, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised Llama-style causal LM of the given size (seeded by the caller)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_tiny_llama_config(spec, tokenizer)).to(dtype)


def build_tiny_reward_model(spec: TinyModelConfig, tokenizer: Any, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised Llama-style model with a one-output score head (seeded by the caller)."""
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification(_tiny_llama_config(spec, tokenizer, num_labels=1)).to(dtype)


def _from_pretrained(auto_class: Any, config: ModelConfig, dtype: torch.dtype, what: str, **extra: Any) -> Any:
    try:
        return auto_class.from_pretrained(config.path, revision=config.revision,
                                          trust_remote_code=config.trust_remote_code, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load {what} from '{config.path}' (model.path): {exc}") from None


def load_causal_lm(config: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    """The causal LM to train, in the configured dtype."""
    dtype = DTYPES[config.dtype]
    if config.tiny is not None:
        return build_tiny_model(config.tiny, tokenizer, dtype)
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
    dtype = DTYPES[config.dtype]
    if config.tiny is not None:
        return build_tiny_reward_model(config.tiny, tokenizer, dtype)
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification, config, dtype, "a reward model", num_labels=1)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# forward kind of a run's losses -> the model class that kind needs (see aligner.forward.FORWARDS)
MODEL_LOADERS = {"logprobs": load_causal_lm, "reward": load_reward_model}


def load_model(config: ModelConfig, tokenizer: Any, forward_kind: str = "logprobs") -> torch.nn.Module:
    """The model to train, in the configured dtype, with the head the stages' losses need."""
    return MODEL_LOADERS[forward_kind](config, tokenizer)
