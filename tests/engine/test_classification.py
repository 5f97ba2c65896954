"""A classifier or reward model (a *ForSequenceClassification checkpoint on a Llama-family decoder) gives HF
transformers' class probabilities for the prompt's last token, on every path an embedding request takes (whole, in
chunks, from the prefix cache), and the likeliest class by its name; it generates nothing."""

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

from workers.engine.classification import classes_of, classified
from workers.engine.errors import InvalidRequestError
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

SENTIMENT = ("negative", "neutral", "positive")
PAD = 2  # the tiny models' pad token: HF pools the last token that is not one, so the prompts leave it out


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(PAD + 1, 49152) for _ in range(n)]


@torch.no_grad()
def hf_probs(path, token_ids: list[int]) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    logits = model(torch.tensor([token_ids])).logits[0]
    return torch.sigmoid(logits) if len(logits) == 1 else torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_the_probabilities_are_hfs_for_the_last_token(tiny_classifier_factory, arch):
    path = tiny_classifier_factory(arch, SENTIMENT)
    llm = LLM(str(path), num_kv_blocks=64, progress=False)
    prompts = [random_prompt(1, 1), random_prompt(2, 37), random_prompt(3, 200)]
    for prompt, result in zip(prompts, llm.classify(prompts)):
        expected = hf_probs(path, prompt)
        torch.testing.assert_close(torch.tensor(result.probs), expected, atol=1e-5, rtol=0)
        assert result.label == SENTIMENT[int(expected.argmax())]


def test_chunks_and_cache_hits_give_the_same_probabilities(tiny_classifier_factory):
    path = tiny_classifier_factory("llama", SENTIMENT)
    llm = LLM(str(path), num_kv_blocks=64, max_num_batched_tokens=13, progress=False)
    prompt = random_prompt(4, 50)
    first = llm.classify(prompt)[0]  # in 13-token chunks
    again = llm.classify(prompt)[0]  # its first 48 tokens from the prefix cache
    assert llm.engine.num_cached_prompt_tokens == 48
    for result in (first, again):
        torch.testing.assert_close(torch.tensor(result.probs), hf_probs(path, prompt), atol=1e-5, rtol=0)


def test_a_reward_models_single_score_comes_through_a_sigmoid(tiny_classifier_factory):
    path = tiny_classifier_factory("qwen2", ("score",))
    prompt = random_prompt(5, 20)
    [result] = LLM(str(path), num_kv_blocks=64, progress=False).classify(prompt)
    assert result.label == "score"
    torch.testing.assert_close(torch.tensor(result.probs), hf_probs(path, prompt), atol=1e-5, rtol=0)


def test_a_classifier_generates_and_embeds_nothing_and_only_a_classifier_classifies(tiny_classifier_factory,
                                                                                   tiny_model_factory):
    classifier = LLM(str(tiny_classifier_factory("llama", SENTIMENT)), num_kv_blocks=64, progress=False)
    with pytest.raises(InvalidRequestError, match="classifier"):
        classifier.generate([5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="classifier"):
        classifier.embed([5, 6, 7])
    with pytest.raises(ValueError, match="no classification head"):
        LLM(str(tiny_model_factory("llama")), num_kv_blocks=64, progress=False).classify([5, 6, 7])


@pytest.mark.parametrize(("problem_type", "activation"), [
    (None, lambda logits: torch.softmax(logits, dim=-1)),
    ("single_label_classification", lambda logits: torch.softmax(logits, dim=-1)),
    ("multi_label_classification", torch.sigmoid),
    ("regression", lambda logits: logits),
])
def test_the_configs_problem_type_says_how_logits_become_probabilities(problem_type, activation):
    """As HF trains each kind (and vLLM reads it): classes that exclude each other, classes that do not, scores."""
    config = LlamaConfig(architectures=["LlamaForSequenceClassification"], num_labels=3, problem_type=problem_type)
    classes = classes_of(config)
    logits = [0.5, -1.0, 2.0]
    result = classified(logits, classes)
    assert classes.labels == ("LABEL_0", "LABEL_1", "LABEL_2") and result.label == "LABEL_2"
    torch.testing.assert_close(torch.tensor(result.probs), activation(torch.tensor(logits)))
    assert classes_of(LlamaConfig(architectures=["LlamaForCausalLM"])) is None


def test_a_cross_encoder_scores_each_pair_read_together(tiny_classifier_factory):
    path = tiny_classifier_factory("qwen2", ("relevance",))
    llm = LLM(str(path), num_kv_blocks=64, progress=False)
    query, documents = "Which river runs through Paris?", ["The Seine.", "Bread rises with yeast."]
    pairs = [llm.tokenizer(query, text_pair=d)["input_ids"] for d in documents]
    assert llm.score(query, documents) == pytest.approx([hf_probs(path, p)[0].item() for p in pairs], abs=1e-5)
    assert llm.score([query, query], documents[::-1]) == pytest.approx(llm.score(query, documents)[::-1], abs=1e-6)
    with pytest.raises(ValueError, match="text_1"):
        llm.score([query, query], documents[:1])
    with pytest.raises(ValueError, match="not a cross-encoder"):
        LLM(str(tiny_classifier_factory("llama", SENTIMENT)), num_kv_blocks=64, progress=False).score("a", "b")
