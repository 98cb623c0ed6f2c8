"""The ``reward_model`` and ``llm`` judges on tiny models saved to a temporary directory."""

from __future__ import annotations

import pytest
import torch

from aligner.judges.llm import LLMJudge
from aligner.judges.reward_model import RewardModelJudge
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    tokenizer = load_builtin_tokenizer()
    directory = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = load_builtin_tokenizer()
    directory = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(_llama_config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_reward_model_judge_scores_prompt_and_completion_like_the_model(reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    judge = RewardModelJudge(RewardModelJudge.Options(path=str(reward_model_dir), batch_size=2))
    prompts = ["Describe the red cat.", "Tell me about the blue dog.", "Describe the red cat."]
    completions = ["The red cat is kind and calm.", "The blue dog is rude.", "The red cat is ugly and sad and cold."]
    scores = judge.score(prompts, completions)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = load_builtin_tokenizer()
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        # plain template: BOS + prompt + " " + completion + EOS, scored alone (no padding)
        ids = [tokenizer.bos_token_id, *tokenizer(prompt + " " + completion + "</s>", add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert scores[0] != scores[2]


def test_reward_model_judge_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="no saved model"):
        RewardModelJudge.Options(path=str(tmp_path))


def test_llm_judge_pointwise_reads_yes_versus_no(causal_lm_dir):
    judge = LLMJudge(LLMJudge.Options(path=str(causal_lm_dir), constitution=["Be kind."]))
    prompts, completions = ["Describe the red cat.", "Describe the dog."], ["The red cat is kind.", "The dog is rude."]
    scores = judge.score(prompts, completions)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(causal_lm_dir).eval()
    tokenizer = load_builtin_tokenizer()

    def logp(text: str, choice: str) -> float:
        # log P(choice | judge prompt), the choice's tokens one by one, computed without padding
        prompt_ids = tokenizer(text)["input_ids"]
        ids = prompt_ids + tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logps = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        return sum(logps[i - 1, ids[i]].item() for i in range(len(prompt_ids), len(ids)))

    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        text = judge.render(judge.pointwise, question=prompt, answer=completion)
        assert text.startswith("Judge the answer by these principles:\n- Be kind.\n")
        yes, no = logp(text, " Yes"), logp(text, " No")
        assert score == pytest.approx(torch.softmax(torch.tensor([yes, no]), 0)[0].item(), abs=1e-5)


def test_llm_judge_pairwise_swapping_removes_position_bias(causal_lm_dir, tmp_path):
    principles = tmp_path / "constitution.txt"
    principles.write_text("Be kind.\n\nBe brief.\n")
    options = dict(path=str(causal_lm_dir), constitution_file=str(principles))
    judge = LLMJudge(LLMJudge.Options(**options))
    assert judge.options.constitution == ["Be kind.", "Be brief."]
    prompts, a, b = ["Describe the red cat."] * 2, ["The red cat is kind.", "Hello"], ["The red cat is rude.", "Bye"]
    forward, backward = judge.compare(prompts, a, b), judge.compare(prompts, b, a)
    for f, r in zip(forward, backward, strict=True):
        assert f + r == pytest.approx(1.0, abs=1e-6)
    # Without swapping, a random judge favours a position: the two orders do not add up to 1.
    biased = LLMJudge(LLMJudge.Options(**options, swap=False))
    assert biased.compare(prompts, a, b)[0] + biased.compare(prompts, b, a)[0] != pytest.approx(1.0, abs=1e-4)
