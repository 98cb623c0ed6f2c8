"""The prompt/completion boundary as the model sees it (issue 16), and what templates write.

Tokenizers are trained here, on a small corpus in tmp_path (no downloads): sentencepiece-style BPE
(``Metaspace``, as SentencePieceBPE; and the same vocabulary in the Llama layout, whose normalizer
writes the ``▁``), a sentencepiece Unigram model, and a GPT-2-style byte-level BPE; plus the
built-in tokenizer. Each is wrapped as a transformers fast tokenizer. Ids and masks are asserted
exactly: ``prompt_ids + completion_ids`` must be the tokenization of the whole text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from aligner.data.batching import collate
from aligner.data.loading import Row
from aligner.data.templates import load_template
from aligner.data.tokenize import (
    encode_prompt_completion,
    prompt_token_limit,
    split_prompt_completions,
    tokenize_rows,
)
from aligner.errors import ConfigError
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
COLORS = ["red", "blue", "green", "black", "white", "small", "big", "old"]
ANIMALS = ["cat", "dog", "bird", "horse", "fish"]
WORDS = ["kind", "calm", "rude", "sad", "good", "happy"]


def _corpus(path: Path) -> Path:
    lines = []
    for c in COLORS:
        for a in ANIMALS:
            for w in WORDS:
                lines += [f"The {c} {a} was a {w} {a}.", f"Describe the {c} {a}. The {a} is {w}.",
                          f"user: Tell me about the {c} {a}.\nassistant: It was a {w} {a}."]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(kind: str, directory: Path):
    """Train a tokenizer of ``kind`` on the corpus and load it back as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [str(_corpus(directory / "corpus.txt"))]
    if kind == "byte_bpe":  # GPT-2 style: bytes, a leading space belongs to the word after it
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train(corpus, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        if kind == "sp_unigram":
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=SPECIAL, unk_token="<unk>",
                                              show_progress=False, initial_alphabet=["\n"])
        else:
            tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
            trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIAL, show_progress=False,
                                          initial_alphabet=["\n"])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        tok.train(corpus, trainer)
        if kind == "sp_llama":  # Llama's tokenizer.json: the normalizer writes the ▁, no pre-tokenizer
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.pre_tokenizer = None
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        # Llama-style: the tokenizer adds BOS itself, so training prepends it.
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = directory / f"{kind}.json"
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL[4:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache: dict = {}

    def get(kind: str):
        if kind == "builtin":
            return load_builtin_tokenizer()
        if kind not in cache:
            cache[kind] = _train(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def _rows(*data: dict) -> list[Row]:
    return [Row(d, f"rows.jsonl, line {i}") for i, d in enumerate(data, 1)]


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def _whole(tokenizer, text: str) -> list[int]:
    """The tokens of the whole text as the model reads it (BOS added where the tokenizer adds it)."""
    return tokenizer(text, add_special_tokens=tokenizer.bos_token_id == 1)["input_ids"]


# Plain template, string prompt "Describe the red cat." and completion "The cat is kind.": the
# rendered text is "Describe the red cat. The cat is kind.</s>". Expected tokens of each side.
EXPECTED = {
    # Tokenized apart, the prompt would end in a lone "▁" (the stray token); jointly the
    # space is the start of "▁The", the boundary token, which belongs to the completion.
    "sp_bpe": (["<s>", "▁Describe", "▁the", "▁red", "▁cat."], ["▁The", "▁cat", "▁is", "▁kind", ".", "</s>"]),
    "sp_llama": (["<s>", "▁Describe", "▁the", "▁red", "▁cat."], ["▁The", "▁cat", "▁is", "▁kind", ".", "</s>"]),
    # This small Unigram vocabulary has no "▁The": the whole text has a lone "▁" there, which lies
    # wholly in the prompt (the model reads it either way; nothing is added or split).
    "sp_unigram": (["<s>", "▁", "D", "e", "s", "c", "r", "i", "b", "e", "▁", "t", "h", "e", "▁", "r", "e", "d",
                    "▁cat.", "▁"], ["T", "h", "e", "▁cat", "▁", "is", "▁kind", ".", "</s>"]),
    "byte_bpe": (["Describe", "Ġthe", "Ġred", "Ġcat", "."], ["ĠThe", "Ġcat", "Ġis", "Ġkind", ".", "</s>"]),
    # The built-in vocabulary has no "ĠThe" either; it adds no BOS.
    "builtin": (["Describe", "Ġthe", "Ġred", "Ġcat", ".", "Ġ"], ["The", "Ġcat", "Ġis", "Ġkind", ".", "</s>"]),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_prompt_and_completion_are_the_tokens_of_the_whole_text(trained, kind):
    tokenizer = trained(kind)
    template = load_template("plain", tokenizer, chat_data=False)
    rows = _rows({"prompt": "Describe the red cat.", "completion": "The cat is kind."})
    example = tokenize_rows(rows, "sft", tokenizer, template, max_length=64, max_prompt_length=32).examples[0]
    prompt, completion = EXPECTED[kind]
    assert (_tokens(tokenizer, example["prompt_ids"]), _tokens(tokenizer, example["completion_ids"])) == (prompt,
                                                                                                        completion)
    assert example["prompt_ids"] + example["completion_ids"] == _whole(tokenizer,
                                                                       "Describe the red cat. The cat is kind.</s>")
    if kind in ("sp_bpe", "sp_llama"):
        # The bug this replaces: the prompt tokenized on its own ends in a lone "▁".
        assert _tokens(tokenizer, tokenizer("Describe the red cat. ", add_special_tokens=False)["input_ids"])[-1] == "▁"
        assert "▁" not in _tokens(tokenizer, example["prompt_ids"] + example["completion_ids"])
    # The completion mask is exactly the completion's tokens.
    batch = collate([example], "sft", tokenizer.pad_token_id)
    n_prompt = len(example["prompt_ids"])
    assert batch["completion_mask"][0].tolist() == [0] * n_prompt + [1] * len(example["completion_ids"])
    assert batch["input_ids"][0].tolist() == example["prompt_ids"] + example["completion_ids"]


@pytest.mark.parametrize("kind", ["sp_bpe", "sp_llama"])
def test_sentencepiece_sequence_reads_like_the_sentence_and_generation_starts_where_training_does(trained, kind):
    """The issue's case: "...▁was ▁ ▁a..." is now "...▁was ▁a...", and a prompt-only row (rollouts,
    ``label``) ends where the training prompt ends, so a sampled continuation starts with "▁a"."""
    tokenizer = trained(kind)
    template = load_template("plain", tokenizer, chat_data=False)
    sft = tokenize_rows(_rows({"prompt": "The cat was", "completion": "a kind cat."}), "sft", tokenizer, template,
                        max_length=64, max_prompt_length=32).examples[0]
    assert _tokens(tokenizer, sft["prompt_ids"]) == ["<s>", "▁The", "▁cat", "▁was"]
    assert _tokens(tokenizer, sft["completion_ids"]) == ["▁a", "▁kind", "▁cat.", "</s>"]
    online = tokenize_rows(_rows({"prompt": "The cat was"}), "prompt", tokenizer, template,
                           max_length=64, max_prompt_length=32).examples[0]
    assert online["prompt_ids"] == sft["prompt_ids"]


def test_prompt_only_rows_keep_a_space_the_vocabulary_does_not_merge(trained):
    """With the built-in vocabulary (no "ĠThe"), the quickstart's completions start with "The" after
    a lone "Ġ": a rollout prompt ends with that "Ġ", as the training prompts do."""
    tokenizer = trained("builtin")
    template = load_template("plain", tokenizer, chat_data=False)
    sft = tokenize_rows(_rows({"prompt": "Describe the red cat.", "completion": "The cat is kind."}), "sft",
                        tokenizer, template, max_length=64, max_prompt_length=32).examples[0]
    online = tokenize_rows(_rows({"prompt": "Describe the red cat."}), "prompt", tokenizer, template,
                           max_length=64, max_prompt_length=32).examples[0]
    assert online["prompt_ids"] == sft["prompt_ids"]


@pytest.mark.parametrize("kind", ["sp_bpe", "byte_bpe", "builtin"])
def test_preference_pairs_share_one_prompt_and_masks_cover_each_completion(trained, kind):
    tokenizer = trained(kind)
    template = load_template("plain", tokenizer, chat_data=False)
    rows = _rows({"prompt": "The cat was", "chosen": "a kind cat.", "rejected": "rude."})
    example = tokenize_rows(rows, "preference", tokenizer, template, max_length=64, max_prompt_length=32).examples[0]
    for field, text in (("chosen", "a kind cat."), ("rejected", "rude.")):
        assert example["prompt_ids"] + example[field + "_ids"] == _whole(tokenizer, f"The cat was {text}</s>")
    batch = collate([example], "preference", tokenizer.pad_token_id)
    n = len(example["prompt_ids"])
    for i, field in enumerate(("chosen", "rejected")):
        ids = example[field + "_ids"]
        assert batch["completion_mask"][i].tolist()[:n + len(ids)] == [0] * n + [1] * len(ids)
        assert batch["input_ids"][i][batch["completion_mask"][i].bool()].tolist() == ids


def test_chatml_boundary_and_multi_turn_completion(trained):
    tokenizer = trained("builtin")
    template = load_template("chatml", tokenizer, chat_data=True)
    prompt = [{"role": "user", "content": "Describe the cat."}]
    completion = [{"role": "assistant", "content": "It is kind."}, {"role": "user", "content": "And?"},
                  {"role": "assistant", "content": "Calm."}]
    assert template.completion_text(completion) == (
        "It is kind.<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\nCalm.<|im_end|>\n")
    # The completion reads as the same conversation would in a prompt.
    assert template.prompt_text(prompt) + template.completion_text(completion) == "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in prompt + completion)
    example = tokenize_rows(_rows({"prompt": prompt, "completion": completion}), "sft", tokenizer, template,
                            max_length=128, max_prompt_length=64).examples[0]
    assert tokenizer.decode(example["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert example["prompt_ids"] + example["completion_ids"] == _whole(
        tokenizer, template.prompt_text(prompt) + template.completion_text(completion))
    assert tokenizer.decode(example["completion_ids"]) == template.completion_text(completion)


def test_plain_template_writes_roles_as_its_file_says(trained):
    template = load_template("plain", trained("builtin"), chat_data=True)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    assert template.prompt_text(prompt) == (
        "system: Be brief.\nuser: Hi there\nassistant: Hello!\nuser: How are you?\nassistant: ")
    assert template.completion_text([{"role": "assistant", "content": "Fine."}]) == "Fine.</s>"
    assert template.completion_text([{"role": "assistant", "content": "Fine."}, {"role": "user", "content": "Good."},
                                     {"role": "assistant", "content": "Yes."}]) == (
        "Fine.\nuser: Good.\nassistant: Yes.</s>")
    # A string prompt is text to continue: as written, then a space.
    assert template.prompt_text("Describe the red cat.") == "Describe the red cat. "


def test_alpaca_multi_turn_completion_uses_the_alpaca_blocks(trained):
    template = load_template("alpaca", trained("builtin"), chat_data=True)
    completion = [{"role": "assistant", "content": "A."}, {"role": "user", "content": "More."},
                  {"role": "assistant", "content": "B."}]
    assert template.completion_text(completion) == "A.</s>\n\n### Instruction:\nMore.\n\n### Response:\nB.</s>"


def test_a_template_file_with_an_unknown_key_is_refused(tmp_path, trained):
    path = tmp_path / "mine.yaml"
    path.write_text('message: "{content}\\n"\ngeneraton_prompt: "> "\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) generaton_prompt; known keys: .*generation_prompt"):
        load_template(str(path), trained("builtin"), chat_data=False)


class _SlowView:
    """The same tokenizer without offsets (as a slow, Python tokenizer): the prefix check is used."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tokenizer(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("kind", ["sp_bpe", "sp_unigram", "byte_bpe", "builtin"])
def test_a_tokenizer_without_offsets_splits_the_same_way(trained, kind):
    tokenizer = trained(kind)
    template = load_template("plain", tokenizer, chat_data=False)
    rows = _rows({"prompt": "Describe the red cat.", "chosen": "The cat is kind.", "rejected": "It was a sad cat."},
                 {"prompt": "The cat was", "chosen": "a kind cat.", "rejected": "rude."})
    fast = tokenize_rows(rows, "preference", tokenizer, template, max_length=64, max_prompt_length=32)
    slow = tokenize_rows(rows, "preference", _SlowView(tokenizer), template, max_length=64, max_prompt_length=32)
    assert slow.examples == fast.examples


def test_the_boundary_token_belongs_to_the_completion_when_it_merges_across(trained):
    """A prompt cut inside a word: the token that spans the boundary is trained, the prompt ends before it."""
    tokenizer = trained("byte_bpe")
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, "The cat was a ki", "nd cat.")
    assert _tokens(tokenizer, prompt_ids) == ["The", "Ġcat", "Ġwas", "Ġa"]
    assert _tokens(tokenizer, completion_ids) == ["Ġkind", "Ġcat", "."]


def test_completions_that_split_the_prompt_end_differently_share_the_common_prefix(trained):
    """Whitespace before the boundary can tokenize differently per completion (GPT-2's regex keeps a
    space before a word with the word): the pair's one prompt is the common part."""
    tokenizer = trained("byte_bpe")
    (prompt_ids, (chosen, rejected)), = split_prompt_completions(tokenizer, ["The cat  "], [["was", "\nwas"]])
    assert _tokens(tokenizer, prompt_ids) == ["The", "Ġcat", "Ġ"]
    assert (_tokens(tokenizer, chosen), _tokens(tokenizer, rejected)) == (["Ġwas"], ["Ġ", "Ċ", "w", "as"])
    for text, ids in (("was", chosen), ("\nwas", rejected)):
        assert prompt_ids + ids == tokenizer("The cat  " + text, add_special_tokens=False)["input_ids"]


def test_truncation_keeps_the_joint_tokens(trained):
    tokenizer = trained("sp_bpe")
    template = load_template("plain", tokenizer, chat_data=False)
    rows = _rows({"prompt": "The red cat was a kind cat. The cat was", "completion": "a kind cat."})
    example = tokenize_rows(rows, "sft", tokenizer, template, max_length=6, max_prompt_length=4).examples[0]
    # BOS kept, then the prompt's last three tokens; the completion cut from the right.
    assert _tokens(tokenizer, example["prompt_ids"]) == ["<s>", "▁The", "▁cat", "▁was"]
    assert _tokens(tokenizer, example["completion_ids"]) == ["▁a", "▁kind"]


def _data(max_length: int, max_prompt_length: int | None, written: bool = True):
    data = SimpleNamespace(max_length=max_length, max_prompt_length=max_prompt_length)
    data.model_fields_set = {"max_length", "max_prompt_length"} if written else {"max_length"}
    return data


def test_a_prompt_limit_that_leaves_no_room_is_warned_about_naming_the_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert prompt_token_limit(_data(256, 256), "preference", 0, "dpo", 1) == 256
    assert ("stage 'dpo': 'stages[1].data.max_prompt_length' (256) with 'stages[1].data.max_length' (256) leaves "
            "no room for completion tokens") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert prompt_token_limit(_data(256, 250), "sft", 0, "sft", 0) == 250
    assert "leaves only 6 completion tokens" in caplog.text and "at least 32 remain" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert prompt_token_limit(_data(512, 256), "sft", 0, "sft", 0) == 256
    assert caplog.text == ""


def test_an_unset_prompt_limit_leaves_room_for_completions(caplog):
    """HH-RLHF with ``max_length: 256`` alone lost 40% of its rows: unset, the limit leaves room."""
    with caplog.at_level(logging.INFO, logger="aligner"):
        assert prompt_token_limit(_data(256, 256, written=False), "preference", 0, "dpo", 0) == 224
        assert prompt_token_limit(_data(48, None), "sft", 0, "sft", 0) == 36
        assert prompt_token_limit(_data(1024, 256, written=False), "sft", 0, "sft", 0) == 256
    assert caplog.text == ""
    # Prompt-only data: room for the generated tokens, as before.
    assert prompt_token_limit(_data(48, 256, written=False), "prompt", 16, "grpo", 0) == 32
    with pytest.raises(ConfigError, match=r"max_new_tokens 48 leaves no room"):
        prompt_token_limit(_data(48, 256), "prompt", 48, "grpo", 0)


def test_the_real_config_reads_as_unset_until_written(make_config):
    from aligner.config import load_config

    config = make_config("sft")
    assert prompt_token_limit(load_config(config).stages[0].data, "sft", 0, "sft", 0) == 36  # max_length 48
    config["stages"][0]["data"]["max_prompt_length"] = 40
    assert prompt_token_limit(load_config(config).stages[0].data, "sft", 0, "sft", 0) == 40
