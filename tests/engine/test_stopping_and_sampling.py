"""Per-request sampling and stopping, through the whole engine on the real SmolLM2."""

import pytest

from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), num_kv_blocks=512, progress=False)


def ask(llm, question):
    return llm.apply_chat_template([{"role": "user", "content": question}])


def test_seeded_request_gives_the_same_tokens_alone_and_inside_a_batch(llm):
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = ask(llm, "Tell me a story about a dragon.")
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    noise = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    batch = llm.generate([ask(llm, "Hi"), prompt, ask(llm, "Why?")], [noise, seeded, noise])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=4321,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_eos_ends_a_chat_answer_with_reason_stop(llm):
    out = llm.generate(ask(llm, "What is the capital of France?"), SamplingParams(max_tokens=64, temperature=0))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None
    assert len(out.outputs[0].token_ids) < 64
    assert "<|im_end|>" not in out.outputs[0].text


def test_max_tokens_ends_with_reason_length(llm):
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5


def test_stop_string_cuts_the_text_and_is_reported(llm):
    full = llm.generate(ask(llm, "What is the capital of France?"), SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in full.outputs[0].text
    cut = llm.generate(ask(llm, "What is the capital of France?"),
                       SamplingParams(max_tokens=32, temperature=0, stop=["Paris"]))[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == "Paris"
    assert cut.outputs[0].text == full.outputs[0].text.split("Paris")[0]


def test_stop_token_id_ends_generation_on_that_token(llm):
    full = llm.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    stop_at = full.outputs[0].token_ids[3]
    out = llm.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                        stop_token_ids=[stop_at]))[0]
    first = full.outputs[0].token_ids.index(stop_at)
    assert out.outputs[0].token_ids == full.outputs[0].token_ids[:first + 1]
    assert out.outputs[0].stop_reason == stop_at


def test_logprobs_hold_the_top_n_and_the_chosen_token(llm):
    out = llm.generate("The sky is", SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=3,
                                                    ignore_eos=True))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 6
    for token, logprobs in zip(completion.token_ids, completion.logprobs):
        assert token in logprobs and 3 <= len(logprobs) <= 4
        assert all(v <= 0 for v in logprobs.values())


def test_usage_counts_prompt_cached_and_generated_tokens(llm):
    prompt = ask(llm, "Summarize the plot of Hamlet in two sentences, please, for a school report.")
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))
    out = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    usage = out.usage
    assert usage.prompt_tokens == len(prompt)
    assert usage.cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
    assert usage.generated_tokens == 4


def test_min_tokens_holds_back_eos_stop_tokens_and_stop_strings(llm):
    prompt = ask(llm, "What is the capital of France?")
    plain = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0))[0].outputs[0]
    assert plain.finish_reason == "stop" and len(plain.token_ids) < 20  # EOS comes early without min_tokens
    held = llm.generate(prompt, SamplingParams(max_tokens=20, min_tokens=20, temperature=0))[0].outputs[0]
    assert held.finish_reason == "length" and len(held.token_ids) == 20
    assert not set(held.token_ids) & llm.engine.eos_token_ids
    assert held.token_ids[:len(plain.token_ids) - 1] == plain.token_ids[:-1]  # the same answer up to its EOS
    # A stop token id and a stop string that match early are not honoured before min_tokens tokens.
    first = plain.token_ids[0]
    by_token = llm.generate(prompt, SamplingParams(max_tokens=6, min_tokens=6, temperature=0,
                                                   stop_token_ids=[first]))[0].outputs[0]
    assert len(by_token.token_ids) == 6 and first not in by_token.token_ids
    by_string = llm.generate(prompt, SamplingParams(max_tokens=20, min_tokens=3, temperature=0,
                                                    stop=["capital"]))[0].outputs[0]
    assert "capital" in plain.text.split(" ")[:3]  # the string is there within the first three tokens
    assert len(by_string.token_ids) > 3 and by_string.text.startswith(plain.text.split("capital")[0] + "capital")
