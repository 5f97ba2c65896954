"""Bad input is a typed error with a message naming the field, and the engine keeps serving everyone else."""

import math
import pickle

import pytest

from workers.engine.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
)
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

GREEDY_FIELDS = dict(max_tokens=4, temperature=0.0)
GREEDY = SamplingParams(**GREEDY_FIELDS)


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(str(tiny_model_factory("llama")), num_kv_blocks=64, max_model_len=256,
               max_num_batched_tokens=64, progress=False)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"priority": 1.5}, "priority"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field
    assert field in str(e.value)


def test_a_negative_seed_is_a_signed_64_bit_one_and_minus_one_is_none_as_in_vllm():
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-5).seed == 2**64 - 5
    assert SamplingParams(seed=-2**63).seed == 2**63


@pytest.mark.parametrize("prompt, field", [
    ("", "prompt"),
    ([], "prompt_token_ids"),
    ([1, -1, 2], "prompt_token_ids"),
    ([49152], "prompt_token_ids"),
])
def test_bad_prompts_name_the_field(llm, prompt, field):
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request(prompt, GREEDY)
    assert e.value.field == field


def test_prompt_at_the_context_length_is_rejected_one_below_is_served(llm):
    with pytest.raises(PromptTooLongError):
        llm.generate([5] * 256, GREEDY)
    out = llm.generate([5] * 255, GREEDY)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 1


def test_prompt_larger_than_the_whole_kv_cache_is_rejected(tiny_model_factory):
    small = LLM(str(tiny_model_factory("llama")), num_kv_blocks=4, progress=False)
    with pytest.raises(PromptTooLongError, match="KV cache"):
        small.generate([5] * 64, GREEDY)


def test_too_many_logprobs_and_out_of_vocab_token_ids_are_rejected(llm):
    with pytest.raises(InvalidRequestError, match="logprobs"):
        llm.generate([1, 2, 3], SamplingParams(logprobs=21))
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.generate([1, 2, 3], SamplingParams(stop_token_ids=[10**9]))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        llm.generate([1, 2, 3], SamplingParams(logit_bias={10**9: 1.0}))
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        llm.generate([1, 2, 3], SamplingParams(allowed_token_ids=[5, 10**9]))


def test_a_priority_needs_the_priority_scheduling_policy(llm, tiny_model_factory):
    with pytest.raises(InvalidRequestError, match="priority: this server runs requests in arrival order"):
        llm.generate([1, 2, 3], SamplingParams(priority=1))
    by_priority = LLM(str(tiny_model_factory("llama")), num_kv_blocks=16, scheduling_policy="priority",
                      progress=False)
    assert by_priority.generate([1, 2, 3], SamplingParams(priority=1, **GREEDY_FIELDS))[0].outputs[0].token_ids == \
        llm.generate([1, 2, 3], GREEDY)[0].outputs[0].token_ids


def test_bans_that_leave_no_token_to_take_are_refused(llm):
    word = llm.engine.tokenizer.decode([300])
    with pytest.raises(InvalidRequestError, match="bad_words: bans every token allowed_token_ids allows"):
        llm.generate([1, 2, 3], SamplingParams(allowed_token_ids=[300], bad_words=[word]))
    ends = sorted(llm.engine.eos_token_ids)
    with pytest.raises(InvalidRequestError, match="allowed_token_ids: allows only tokens that end the request"):
        llm.generate([1, 2, 3], SamplingParams(allowed_token_ids=ends, min_tokens=1))
    assert llm.generate([1, 2, 3], SamplingParams(allowed_token_ids=ends, min_tokens=1, ignore_eos=True,
                                                  max_tokens=2))[0].outputs[0].token_ids == [ends[0]] * 2


def test_one_bad_prompt_in_a_batch_runs_nothing_and_leaks_nothing(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([[1, 2, 3], [], [4, 5]], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == 64
    assert len(llm.generate([[1, 2, 3], [4, 5]], GREEDY)) == 2


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        LLM(str(tmp_path / "nowhere"))


def test_abort_at_every_phase_frees_every_block(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    queued = engine.add_request([7] * 40, params)
    engine.abort_request(queued)  # still waiting
    prefilling = engine.add_request([8] * 200, params)
    decoding = engine.add_request([9] * 20, params)
    engine.step()  # the 64-token budget prefills part of the long prompt only
    assert 0 < engine.requests[prefilling].seq.num_computed_tokens < 200
    engine.abort_request(prefilling)
    while not engine.requests[decoding].seq.output_token_ids:
        engine.step()
    final = engine.abort_request(decoding)
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("error", [InvalidRequestError("temperature", "must be >= 0, got -1"),
                                   PromptTooLongError(2049, 2047, "the KV cache capacity")])
def test_errors_cross_process_boundaries_intact(error):
    """Ray and Serve pickle an exception to hand it to the caller, who maps its class and field to a status."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.field == error.field
