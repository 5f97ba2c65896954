"""Speculative decoding by n-gram lookup: guesses the model agrees with are kept, so the greedy tokens are exactly
one-token-per-step's (and HF's) in fewer steps, whatever ends the request and whatever else is in the batch; a
sampled request keeps the guesses its own draws agree with, so a seeded one draws exactly one-token-per-step's
tokens, before and after another engine takes it over (the sampler's tests check the distribution)."""

from dataclasses import replace

import pytest

from tests.engine.test_continuation import assert_carries_on, run
from tests.hf_reference import hf_greedy
from workers.engine.llm import LLM
from workers.engine.outputs import Continuation
from workers.engine.sampling_params import SamplingParams
from workers.engine.speculative import accept, propose

# A request whose answer quotes it, so the answer's last tokens have occurred before and guesses are mostly right.
QUOTE = ("Repeat the following list exactly, line by line.\n"
         + "".join(f"- item {i}: the {w} fox jumps over the lazy dog\n" for i, w in
                   enumerate(["quick", "slow", "red", "brown", "tired", "happy"])))
GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(smollm2_path):
    return LLM(str(smollm2_path), num_kv_blocks=512, progress=False)


@pytest.fixture(scope="module")
def guessing(smollm2_path):
    return LLM(str(smollm2_path), num_kv_blocks=512, progress=False, num_speculative_tokens=4)


@pytest.fixture(scope="module")
def quoting(plain) -> list[int]:
    return plain.apply_chat_template([{"role": "user", "content": QUOTE}])


@pytest.fixture(scope="module")
def answer(plain, quoting):
    """The quoting prompt's greedy answer one token per step: the reference several tests cut short."""
    return plain.generate(quoting, GREEDY)[0].outputs[0]


def tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_the_tokens_after_the_latest_earlier_run_of_the_longest_suffix_are_proposed():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, 2, 4) == [7, 8]  # the latest "1 2 3" is followed by 7 8
    assert propose([5, 2, 3, 9, 4, 2, 3], 3, 2, 4) == [9, 4, 2]  # "2 3" only: the longest run that occurred
    assert propose([1, 2, 3, 4], 3, 2, 4) == []  # no run of two tokens occurred before
    assert propose([7, 7], 4, 1, 4) == [7]  # as many as followed it, up to the end


def test_guesses_are_kept_while_the_model_agrees_then_its_own_pick_follows():
    assert accept([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all agreed: one more token than guessed
    assert accept([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # the second guess lost: the model's pick replaces it
    assert accept([4, 5, 6], [8, 5, 6, 7]) == [8]
    assert accept([], [3]) == [3]


def test_greedy_tokens_equal_one_token_per_step_and_hfs_in_fewer_steps(plain, guessing, quoting, answer,
                                                                       smollm2_path):
    haiku = guessing.apply_chat_template([{"role": "user", "content": "Write a haiku about rain."}])
    prompts = [quoting, haiku]
    steps, guessed, agreed = (guessing.engine.num_steps, guessing.engine.num_guessed_tokens,
                              guessing.engine.num_accepted_guesses)
    expected = [answer.token_ids, *tokens(plain, [haiku], GREEDY)]
    assert tokens(guessing, prompts, GREEDY) == expected
    assert [hf_greedy(smollm2_path, p, GREEDY.max_tokens) for p in prompts] == expected
    agreed = guessing.engine.num_accepted_guesses - agreed
    assert agreed > GREEDY.max_tokens // 2 and guessing.engine.num_guessed_tokens - guessed > agreed
    assert guessing.engine.num_steps - steps <= 2 * GREEDY.max_tokens - agreed  # each agreed guess saved a step


@pytest.mark.parametrize("ending", ["max_tokens", "stop", "stop_token_ids"])
def test_whatever_ends_the_request_inside_a_run_of_agreed_guesses_ends_it_there(plain, guessing, quoting, answer,
                                                                              ending):
    middle = len(answer.text) // 2
    # Each ends the answer about two thirds of the way in, where guesses are being kept.
    params = replace(GREEDY, **{"max_tokens": dict(max_tokens=31), "stop": dict(stop=[answer.text[middle:middle + 9]]),
                                "stop_token_ids": dict(stop_token_ids=[answer.token_ids[30]])}[ending])
    expected, got = plain.generate(quoting, params)[0].outputs[0], guessing.generate(quoting, params)[0].outputs[0]
    assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
        (expected.token_ids, expected.text, expected.finish_reason, expected.stop_reason)
    assert len(got.token_ids) < GREEDY.max_tokens


def test_neighbours_that_cannot_take_guesses_decode_as_before(plain, guessing, quoting):
    penalised = replace(GREEDY, max_tokens=40, repetition_penalty=1.2)
    batch = [GREEDY, penalised, GREEDY]
    prompts = [quoting] * len(batch)
    expected, got = plain.generate(prompts, batch), guessing.generate(prompts, batch)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_each_kept_guess_has_the_logprobs_of_its_own_row(plain, guessing, quoting):
    with_logprobs = replace(GREEDY, max_tokens=40, logprobs=2)
    agreed = guessing.engine.num_accepted_guesses
    expected, got = plain.generate(quoting, with_logprobs)[0].outputs[0], \
        guessing.generate(quoting, with_logprobs)[0].outputs[0]
    assert got.token_ids == expected.token_ids and guessing.engine.num_accepted_guesses > agreed
    assert len(got.logprobs) == len(got.token_ids)
    for token, got_top, expected_top in zip(got.token_ids, got.logprobs, expected.logprobs):
        assert got_top.keys() == expected_top.keys() and token in got_top
        assert list(got_top.values()) == pytest.approx(list(expected_top.values()), abs=1e-4)


def test_a_seeded_sampled_request_draws_the_tokens_it_draws_one_per_step(plain, guessing, quoting, answer):
    sampled = SamplingParams(max_tokens=40, temperature=0.7, seed=5, ignore_eos=True)
    agreed = guessing.engine.num_accepted_guesses
    assert tokens(guessing, [quoting], sampled) == tokens(plain, [quoting], sampled)
    assert guessing.engine.num_accepted_guesses > agreed
    # Near temperature 0 a draw is the greedy choice, and so is every kept guess.
    cold = replace(sampled, temperature=1e-4)
    assert tokens(guessing, [quoting], cold) == [answer.token_ids[:40]]


@pytest.mark.parametrize("lost_guesses", [False, True])
def test_a_seeded_sampled_request_taken_over_draws_what_it_would_have(plain, guessing, quoting, lost_guesses):
    """Whichever of the two engines guesses, the one that lost the request or the one that carries it on."""
    sampled = SamplingParams(max_tokens=40, temperature=0.7, seed=8, ignore_eos=True)
    lost, taker = (guessing, plain) if lost_guesses else (plain, guessing)
    outs = run(lost, quoting, sampled)
    assert_carries_on(outs, run(taker, quoting, sampled, Continuation.of(outs[4])), 5)


def test_blocks_filled_by_agreed_guesses_serve_the_prefix_cache(guessing, quoting):
    first = guessing.generate(quoting, GREEDY)[0]
    continued = first.prompt_token_ids + first.outputs[0].token_ids[:36]
    again = guessing.generate(continued, replace(GREEDY, max_tokens=8))[0]
    assert again.num_cached_tokens >= len(continued) - guessing.engine.block_size
    assert again.outputs[0].token_ids == first.outputs[0].token_ids[36:44]


def test_preempted_sequences_keep_their_tokens(smollm2_path, plain):
    small = LLM(str(smollm2_path), num_kv_blocks=20, max_num_batched_tokens=256, progress=False,
                num_speculative_tokens=4)
    prompts = [plain.apply_chat_template([{"role": "user", "content": QUOTE.replace("fox", animal)}])
               for animal in ("fox", "cat", "owl")]
    assert tokens(small, prompts, GREEDY) == tokens(plain, prompts, GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
