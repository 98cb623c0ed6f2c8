"""The built-in tokenizer for tiny models: byte-level BPE that needs no download.

It is byte-level, so any text can be encoded; its merges were learned from the quickstart corpus
plus a little general English, so the quickstart's words are single tokens. The file ships in
``aligner/assets``; ``python -m aligner.modeling.tiny_tokenizer`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

ASSET = Path(__file__).parent.parent / "assets" / "tiny_tokenizer.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024

_GENERAL_TEXT = """The quick brown fox jumps over the lazy dog. A model learns to answer questions.
Instruction Response Below is an instruction that describes a task. Write a response that
appropriately completes the request. user assistant system the a an of to in is and it you that
was for on are with as I his they be at one have this from or had by word but what some we can
out other were all there when up use your how said each she which do their time if will way about
many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find"""


def build(corpus: str, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on ``corpus`` (deterministic for the same input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS.values(), *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS,
                                   additional_special_tokens=CHAT_TOKENS)


def load_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped tiny tokenizer."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ASSET), **SPECIAL_TOKENS,
                                        additional_special_tokens=CHAT_TOKENS)
    tokenizer.padding_side = "right"
    return tokenizer


def _corpus() -> str:
    from aligner.quickstart.task import DATA_DIR

    texts = [_GENERAL_TEXT]
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        texts.append(path.read_text())
    return "\n".join(texts)


if __name__ == "__main__":
    ASSET.parent.mkdir(exist_ok=True)
    build(_corpus()).backend_tokenizer.save(str(ASSET))
