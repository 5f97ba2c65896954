"""An embedding request's vector is HF transformers' last hidden state of the prompt's last token, normalized, on
every path a prompt takes through the engine: whole or in chunks, from the prefix cache or the host tier, batched
with requests that generate, and as a one-token last chunk on the padded decode path. It generates nothing, so
its prompt may fill the context, and it leaves its blocks in the prefix cache for later requests."""

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModel

from tests.hf_reference import hf_embedding, hf_greedy
from workers.engine.errors import InvalidRequestError, PromptTooLongError
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def assert_embeds(model_path, out, token_ids: list[int]) -> None:
    vector = torch.tensor(out.embedding)
    assert out.outputs[0].finish_reason == "embedded" and out.outputs[0].token_ids == []
    assert torch.linalg.vector_norm(vector).item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(vector, hf_embedding(model_path, token_ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "granite"])
def test_the_vector_is_hfs_normalized_last_hidden_state(tiny_model_factory, arch):
    model_path = tiny_model_factory(arch)
    llm = LLM(str(model_path), num_kv_blocks=64, progress=False)
    prompts = [random_prompt(1, 1), random_prompt(2, 37), random_prompt(3, 200)]
    for prompt, out in zip(prompts, llm.embed(prompts)):
        assert_embeds(model_path, out, prompt)


def test_text_is_tokenized_as_for_generation(smollm2_path):
    llm = LLM(str(smollm2_path), num_kv_blocks=64, progress=False)
    [out] = llm.embed("The capital of France is Paris.")
    assert_embeds(smollm2_path, out, llm.tokenizer.encode("The capital of France is Paris."))


def test_chunks_cache_hits_and_the_host_tier_give_the_same_vector(tiny_model_factory):
    # An 8-block cache with a host tier, 13-token chunks: the first document is embedded in chunks, pushed out to
    # the host tier by the others, then embedded again from it; then a question on it reads those blocks again.
    model_path = tiny_model_factory("llama")
    llm = LLM(str(model_path), num_kv_blocks=8, kv_offload_gb=0.01, max_num_batched_tokens=13, progress=False)
    docs = [random_prompt(10 + i, 50) for i in range(4)]
    for doc in docs:
        [out] = llm.embed(doc)
        assert out.num_cached_tokens == 0
        assert_embeds(model_path, out, doc)
    [again] = llm.embed(docs[0])
    assert again.num_cached_tokens == 48 and llm.engine.block_manager.num_reloaded_blocks == 3
    assert_embeds(model_path, again, docs[0])
    question = docs[0] + random_prompt(20, 5)
    [answer] = llm.generate(question, GREEDY)
    assert answer.num_cached_tokens == 48
    assert answer.outputs[0].token_ids == hf_greedy(model_path, question, 16)
    assert llm.engine.block_manager.num_free_blocks == 8


def test_embeddings_batched_with_generation_leave_every_request_its_own_result(tiny_model_factory):
    model_path = tiny_model_factory("qwen2")
    llm = LLM(str(model_path), num_kv_blocks=128, max_num_batched_tokens=64, progress=False)
    engine = llm.engine
    generated = [random_prompt(30 + i, 20 + 7 * i) for i in range(4)]
    embedded = [random_prompt(40 + i, 9 + 31 * i) for i in range(4)]
    ids = {}
    for i in range(4):
        ids[engine.add_request(generated[i], GREEDY)] = ("generate", generated[i])
        ids[engine.add_embedding_request(embedded[i])] = ("embed", embedded[i])
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    for request_id, (kind, prompt) in ids.items():
        out = finished[request_id]
        if kind == "embed":
            assert_embeds(model_path, out, prompt)
        else:
            assert out.embedding is None and out.outputs[0].token_ids == hf_greedy(model_path, prompt, 16)


def test_a_one_token_last_chunk_skips_the_padded_decode_path_and_still_embeds(tiny_model_factory):
    # The whole prompt but its last token comes from the cache, so its last chunk looks like a decode step, which
    # would run a CUDA graph that computes logits, not hidden states.
    model_path = tiny_model_factory("llama")
    llm = LLM(str(model_path), num_kv_blocks=64, progress=False)
    llm.engine.runner.use_padded_decode(8, capture=False)
    prompt = random_prompt(50, 33)
    llm.embed(prompt)
    [decoding] = llm.generate(random_prompt(51, 5), SamplingParams(max_tokens=1, temperature=0.0))
    [out] = llm.embed(prompt)
    assert out.num_cached_tokens == 32
    assert_embeds(model_path, out, prompt)


def test_the_prompt_may_fill_the_context_but_not_more(tiny_model_factory):
    model_path = tiny_model_factory("llama")
    llm = LLM(str(model_path), num_kv_blocks=128, max_model_len=64, progress=False)
    [out] = llm.embed(random_prompt(60, 64))
    assert_embeds(model_path, out, random_prompt(60, 64))
    with pytest.raises(PromptTooLongError, match="65 tokens exceed the model's context length \\(64\\)"):
        llm.embed(random_prompt(61, 65))
    small = LLM(str(model_path), num_kv_blocks=3, progress=False)
    with pytest.raises(PromptTooLongError, match="49 tokens exceed the KV cache capacity \\(48\\)"):
        small.embed(random_prompt(62, 49))


def test_an_aborted_embedding_request_frees_its_blocks(tiny_model_factory):
    llm = LLM(str(tiny_model_factory("llama")), num_kv_blocks=32, max_num_batched_tokens=16, progress=False)
    engine = llm.engine
    request_id = engine.add_embedding_request(random_prompt(70, 100))
    engine.step()
    assert engine.block_manager.num_free_blocks < 32
    out = engine.abort_request(request_id)
    assert out.embedding is None and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == 32 and not engine.has_unfinished_requests()


def decoder_alone(causal_lm, folder, architecture: str | None = None):
    """The model's decoder as an embedding model's checkpoint holds it: saved from HF's base model class (no
    "model." prefix, no head), under `architecture` where its config.json names another (Qwen3-Embedding's says
    Qwen3ForCausalLM)."""
    AutoModel.from_pretrained(causal_lm).save_pretrained(folder)
    for tokenizer_file in causal_lm.glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    if architecture is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"architectures": [architecture]}))
    return folder


@torch.no_grad()
def base_model_embedding(folder, token_ids: list[int]) -> torch.Tensor:
    hidden = AutoModel.from_pretrained(folder).eval()(torch.tensor([token_ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1)


def test_an_embedding_model_without_a_head_embeds_as_hfs_base_model_and_refuses_to_generate(tiny_model_factory,
                                                                                             tmp_path):
    folder = decoder_alone(tiny_model_factory("mistral"), tmp_path)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MistralModel"]
    llm = LLM(str(folder), num_kv_blocks=32, progress=False)
    prompt = random_prompt(80, 90)
    [out] = llm.embed(prompt)
    torch.testing.assert_close(torch.tensor(out.embedding), base_model_embedding(folder, prompt), atol=2e-5, rtol=0)
    with pytest.raises(InvalidRequestError, match="is an embedding model .*: it serves embeddings only"):
        llm.generate(prompt, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_a_tied_embedding_model_labelled_as_a_causal_lm_loads_whole(tiny_model_factory, tmp_path):
    """Qwen3-Embedding's checkpoint is Qwen3Model's names under a config that says Qwen3ForCausalLM; its tied
    embedding is its head, so it generates too, as the causal model it came from does."""
    causal = tiny_model_factory("qwen3")
    folder = decoder_alone(causal, tmp_path, "Qwen3ForCausalLM")
    llm = LLM(str(folder), num_kv_blocks=32, progress=False)
    prompt = random_prompt(81, 40)
    [out] = llm.embed(prompt)
    torch.testing.assert_close(torch.tensor(out.embedding), base_model_embedding(folder, prompt), atol=2e-5, rtol=0)
    assert llm.generate(prompt, GREEDY)[0].outputs[0].token_ids == hf_greedy(causal, prompt, 16)


def test_an_embedding_model_scores_a_pair_by_the_cosine_of_its_embeddings(tiny_model_factory):
    model_path = tiny_model_factory("qwen3")
    llm = LLM(str(model_path), num_kv_blocks=64, progress=False)
    texts = ["A cat sat on the mat.", "A dog lay on the rug.", "Stocks fell sharply."]
    ids = [llm.tokenizer.encode(t) for t in texts]
    expected = [float(hf_embedding(model_path, ids[0]) @ hf_embedding(model_path, ids[j])) for j in (1, 2)]
    assert llm.score(texts[0], texts[1:]) == pytest.approx(expected, abs=1e-5)
