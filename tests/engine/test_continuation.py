"""A request taken over by another engine, after the group running it was lost, carries on exactly where the
stream stopped: from what the caller had received (tokens, text, logprobs), the new engine's outputs complete
the same request the lost one would have completed, for greedy and seeded requests, penalties and min_tokens,
stop strings that straddle the cut, and structured outputs. The reference is the same request run through
uninterrupted on one engine (test_engine_paths checks that against HF). A prefill group can compute a continuation
too, and hand it with its KV to a decode group, which carries on the same way."""

import random

import pytest

from tests.engine.test_disaggregation import move
from workers.engine.errors import InvalidRequestError
from workers.engine.llm import LLM
from workers.engine.outputs import Continuation, RequestOutput
from workers.engine.sampling_params import SamplingParams, StructuredOutput

NEW = 24


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def lost(model_path) -> LLM:
    """The engine that runs each request from the start: what its caller had received after k tokens is taken
    from its k-th output."""
    return LLM(model_path, num_kv_blocks=256, progress=False)


@pytest.fixture(scope="module")
def taker(model_path) -> LLM:
    """Another engine, with a cache of its own, that takes requests over."""
    return LLM(model_path, num_kv_blocks=256, progress=False)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    rng = random.Random(3)
    return [rng.randrange(49152) for _ in range(37)]


_ids = iter(range(10**6))


def run(llm: LLM, prompt: list[int], params: SamplingParams,
        continuation: Continuation | None = None) -> list[RequestOutput]:
    """Every output of one request, stepped alone on `llm`'s engine."""
    engine = llm.engine
    request_id = engine.add_request(prompt, params, f"r{next(_ids)}", continuation=continuation)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def assert_carries_on(lost_outs: list[RequestOutput], taken: list[RequestOutput], k: int) -> None:
    """`taken` completes the request whose first k outputs its caller had received."""
    whole, final, received = lost_outs[-1].outputs[0], taken[-1].outputs[0], lost_outs[k - 1].outputs[0]
    assert final.token_ids == whole.token_ids
    assert final.text == whole.text
    assert (final.finish_reason, final.stop_reason) == (whole.finish_reason, whole.stop_reason)
    # The stream goes on from what the caller had: nothing sent twice, nothing missing.
    assert received.text + "".join(o.outputs[0].delta_text for o in taken) == whole.text
    assert [t for o in taken for t in o.outputs[0].delta_token_ids] == whole.token_ids[len(received.token_ids):]


@pytest.mark.parametrize("k", [1, 11, 16, 17, NEW - 1])
def test_a_greedy_request_taken_over_after_k_tokens_ends_as_it_would_have(lost, taker, prompt, k):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    outs = run(lost, prompt, params)
    assert_carries_on(outs, run(taker, prompt, params, Continuation.of(outs[k - 1])), k)


def test_a_seeded_sampled_request_draws_what_it_would_have_drawn(lost, taker, prompt):
    params = SamplingParams(max_tokens=NEW, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    outs = run(lost, prompt, params)
    assert_carries_on(outs, run(taker, prompt, params, Continuation.of(outs[9])), 10)


def test_penalties_min_tokens_and_logprobs_count_the_tokens_before_the_cut(lost, taker, prompt):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.8,
                            presence_penalty=0.5, min_tokens=NEW - 2, logprobs=2, logit_bias={5: 3.0})
    outs = run(lost, prompt, params)
    taken = run(taker, prompt, params, Continuation.of(outs[7]))
    assert_carries_on(outs, taken, 8)
    whole, final = outs[-1].outputs[0].logprobs, taken[-1].outputs[0].logprobs
    assert [entry.keys() for entry in final] == [entry.keys() for entry in whole]
    assert [v for entry in final for v in entry.values()] == pytest.approx(
        [v for entry in whole for v in entry.values()], abs=1e-4)


def test_a_stop_string_that_straddles_the_cut_ends_the_request_where_it_would_have(lost, taker, prompt):
    free = run(lost, prompt, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    k = 12
    text_before, text_at = free[k - 2].outputs[0].text, free[k].outputs[0].text
    stop = text_at[len(text_before) - 1:]  # from the last character before token k-1 through token k+1
    assert stop and stop not in text_before
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, stop=[stop])
    outs = run(lost, prompt, params)
    assert outs[-1].outputs[0].stop_reason == stop
    taken = run(taker, prompt, params, Continuation.of(outs[k - 1]))
    assert_carries_on(outs, taken, k)


def test_a_structured_output_holds_across_the_cut(lost, taker, prompt):
    params = SamplingParams(max_tokens=48, temperature=0.0, structured_output=StructuredOutput(json_object=True))
    outs = run(lost, prompt, params)
    assert len(outs) > 6
    assert_carries_on(outs, run(taker, prompt, params, Continuation.of(outs[5])), 6)


@pytest.fixture(scope="module")
def prefiller(model_path) -> LLM:
    """A prefill group's engine: it computes a moved request's prompt and continuation for the taker."""
    return LLM(model_path, num_kv_blocks=256, progress=False)


@pytest.mark.parametrize("params, k", [
    (SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=2), 11),
    (SamplingParams(max_tokens=NEW, temperature=1.0, top_p=0.95, seed=5, ignore_eos=True), 11),
    (SamplingParams(max_tokens=NEW, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.8,
                    presence_penalty=0.5, min_tokens=NEW - 2), 11),
    (SamplingParams(max_tokens=48, temperature=0.0, structured_output=StructuredOutput(json_object=True)), 5),
], ids=["greedy with logprobs", "seeded sampling", "penalties and min_tokens", "structured output"])
def test_a_continuation_prefilled_by_a_prefill_group_carries_on_at_the_decode_group(lost, prefiller, taker, prompt,
                                                                                     params, k):
    """The prefill group samples the token after the continuation under the request's penalties, grammar and
    draws, as the lost group would have; with the 37-token prompt and k = 11, the KV ends inside the fourth block."""
    outs = run(lost, prompt, params)
    assert len(outs) > k
    continuation = Continuation.of(outs[k - 1])
    p, d = prefiller.engine, taker.engine
    p.add_request(prompt, params, "moved", prefill_only=True, continuation=continuation)
    handoff = next(o for o in p.step() if o.request_id == "moved").handoff
    assert handoff.continuation == continuation
    assert len(handoff.block_ids) == -(-(len(prompt) + k) // p.block_size)
    plan = d.add_prefilled_request(handoff, params)
    move(p, d, plan)
    taken = [d.start_prefilled_request(handoff)]
    p.release_pinned("moved")
    while not taken[-1].finished:
        taken += [o for o in d.step() if o.request_id == "moved"]
    assert_carries_on(outs, taken, k)
    if params.logprobs is not None:
        whole, final = outs[-1].outputs[0].logprobs, taken[-1].outputs[0].logprobs
        assert [entry.keys() for entry in final] == [entry.keys() for entry in whole]
        assert [v for entry in final[k:] for v in entry.values()] == pytest.approx(
            [v for entry in whole[k:] for v in entry.values()], abs=1e-4)
    for engine in (p, d):
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.pinned


@pytest.mark.parametrize("continuation, why", [
    (Continuation(list(range(100, 100 + NEW)), ""), "leave no room"),
    (Continuation([-1], ""), "outside the vocabulary"),
    (Continuation([100, 200], "not this text"), "not the text of its token ids"),
], ids=["as many tokens as max_tokens", "a token outside the vocabulary", "text of other tokens"])
def test_a_continuation_that_cannot_be_the_requests_is_refused_and_nothing_runs(taker, prompt, continuation, why):
    params = SamplingParams(max_tokens=NEW, temperature=0.0)
    with pytest.raises(InvalidRequestError, match=why) as refused:
        taker.engine.add_request(prompt, params, "refused", continuation=continuation)
    assert refused.value.field == "continuation"
    assert not taker.engine.has_unfinished_requests()


def test_logprobs_must_come_with_each_generated_token(taker, prompt):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=1)
    text = taker.tokenizer.decode([100, 200])
    with pytest.raises(InvalidRequestError, match="one entry per generated token"):
        taker.engine.add_request(prompt, params, "no-logprobs", continuation=Continuation([100, 200], text))
