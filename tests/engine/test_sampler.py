"""The sampler: greedy, temperature, top-k/top-p, biases and penalties, seeded reproducibility and logprobs, on
small random logits."""

import math
from dataclasses import replace

import pytest
import torch

from workers.engine.errors import InvalidRequestError
from workers.engine.sampler import Sampler, TokenHistory, adjust_logits, make_generator
from workers.engine.sampling_params import SamplingParams


def rand_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def sample(logits: torch.Tensor, params: SamplingParams | list[SamplingParams]):
    """One call of a fixed-seed sampler, so every statistical test here is deterministic."""
    rows = logits.shape[0]
    plist = params if isinstance(params, list) else [params] * rows
    return Sampler(seed=0)(logits, plist, [None] * rows)


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


def chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    observed = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).float()
    expected = probs * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


def test_greedy_is_the_argmax_of_the_raw_logits_in_any_dtype():
    logits = rand_logits(8, 100)
    expected = logits.argmax(-1).tolist()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = sample(logits.to(dtype), SamplingParams(temperature=0.0))
        assert out.token_ids == logits.to(dtype).float().argmax(-1).tolist()
    assert sample(logits, SamplingParams(temperature=0.0)).token_ids == expected
    assert sample(logits, SamplingParams(temperature=0.0)).logprobs == [None] * 8


def test_top_k_one_is_greedy_at_any_temperature():
    logits = rand_logits(64, 50, seed=1)
    for temperature in (0.5, 1.0, 5.0, 100.0):
        out = sample(logits, SamplingParams(temperature=temperature, top_k=1))
        assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy():
    logits = rand_logits(64, 50, seed=2, scale=0.5)
    out = sample(logits, SamplingParams(temperature=2.0, top_p=1e-6))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_samples_only_among_the_k_best_with_per_row_k():
    vocab, rows = 30, 3000
    logits = rand_logits(rows, vocab, seed=3, scale=0.3)  # flat, so without the filter most draws fall outside
    ks = [1, 3, 7] * (rows // 3)
    params = [SamplingParams(temperature=3.0, top_k=k) for k in ks]
    out = sample(logits, params)
    ranks = logits.argsort(dim=-1, descending=True)
    seen_rank = [int((ranks[i] == t).nonzero()) for i, t in enumerate(out.token_ids)]
    assert all(rank < k for rank, k in zip(seen_rank, ks))
    assert max(r for r, k in zip(seen_rank, ks) if k == 7) == 6  # the filter does not just collapse to greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    out = sample(logits, SamplingParams(temperature=1.0, top_p=0.7))
    freq = frequencies(out.token_ids, 4)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.5 / 0.8) < 0.03


def test_disabled_filters_leave_the_distribution_untouched():
    logits = rand_logits(1, 6, seed=4, scale=1.0).repeat(4000, 1)
    for top_k in (0, -1, 6, 100):
        out = sample(logits, SamplingParams(top_k=top_k, top_p=1.0))
        assert chi_square(out.token_ids, logits[0].softmax(-1)) < 25.0  # 5 dof: p < 1e-3


def test_sampled_frequencies_match_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    out = sample(logits, SamplingParams(temperature=1.0))
    assert chi_square(out.token_ids, logits[0].softmax(-1)) < 20.0  # 4 dof: p < 1e-3


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    top_share = []
    for temperature in (0.25, 1.0, 4.0):
        out = sample(logits, SamplingParams(temperature=temperature))
        assert chi_square(out.token_ids, (logits[0] / temperature).softmax(-1)) < 20.0
        top_share.append(float(frequencies(out.token_ids, 5)[0]))
    assert top_share[0] > top_share[1] > top_share[2]


def run_seeded(step_logits: list[torch.Tensor], seed: int, row: int, batch: int) -> list[int]:
    """Samples a seeded request's tokens at `row` of batches whose other rows are unseeded random requests."""
    sampler = Sampler()
    generator = make_generator(seed)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed)
    tokens = []
    for step, own in enumerate(step_logits):
        logits = rand_logits(batch, own.numel(), seed=1000 + step + batch)
        logits[row] = own
        plist = [SamplingParams(temperature=0.8, top_k=5)] * batch
        plist[row] = params
        generators: list[torch.Generator | None] = [None] * batch
        generators[row] = generator
        tokens.append(sampler(logits, plist, generators).token_ids[row])
    return tokens


def test_a_seeded_request_samples_the_same_tokens_wherever_it_sits_in_any_batch():
    step_logits = [rand_logits(1, 200, seed=50 + s, scale=0.5)[0] for s in range(12)]
    alone = run_seeded(step_logits, seed=7, row=0, batch=1)
    assert run_seeded(step_logits, seed=7, row=0, batch=3) == alone
    assert run_seeded(step_logits, seed=7, row=2, batch=4) == alone
    assert run_seeded(step_logits, seed=7, row=5, batch=8) == alone
    assert run_seeded(step_logits, seed=8, row=0, batch=1) != alone


def test_unseeded_sampler_rows_vary_between_calls():
    logits = rand_logits(1, 200, seed=5, scale=0.1)
    sampler = Sampler()
    draws = {sampler(logits, [SamplingParams()], [None]).token_ids[0] for _ in range(20)}
    assert len(draws) > 5


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = rand_logits(6, 40, seed=6, scale=0.2)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0)] * 3
    out = sample(logits, params)
    greedy = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [greedy[i] for i in (0, 2, 4)]


def test_logprobs_hold_the_n_best_plus_the_chosen_token_from_the_raw_logits():
    logits = rand_logits(4, 50, seed=7, scale=1.0)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=5.0, top_k=40, logprobs=2),
        SamplingParams(temperature=5.0, logprobs=0),
    ]
    out = sample(logits, params)
    expected = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        row = out.logprobs[i]
        best = expected[i].topk(params[i].logprobs).indices.tolist()
        assert set(row) == set(best) | {out.token_ids[i]}
        for token, value in row.items():
            assert abs(value - float(expected[i, token])) < 1e-5
    assert len(out.logprobs[0]) == 3  # greedy: the chosen token is the best one


def test_logprobs_of_a_low_ranked_choice_are_still_reported():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(500, 1)
    out = sample(logits, SamplingParams(temperature=50.0, logprobs=1))
    rare = [(t, lp) for t, lp in zip(out.token_ids, out.logprobs) if t == 3]
    assert rare, "a near-uniform temperature should sometimes pick token 3"
    row = rare[0][1]
    assert set(row) == {0, 3}
    assert abs(row[3] - float(logits[0].log_softmax(-1)[3])) < 1e-5


def test_mismatched_batch_sizes_are_rejected():
    with pytest.raises(ValueError):
        Sampler()(rand_logits(2, 10), [SamplingParams()], [None, None])


# -- logit bias and penalties -----------------------------------------------------------------------------------

ROW = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
HISTORY = [TokenHistory(prompt_token_ids=[1, 4], vocab_size=6).update([3, 3, 2])]


def adjusted(**params) -> list[float]:
    return adjust_logits(ROW, [SamplingParams(**params)], HISTORY)[0].tolist()


def test_logit_bias_adds_to_the_named_tokens():
    assert adjusted(logit_bias={0: 1.5, 5: -100}) == [3.5, -1.0, 0.5, 3.0, -2.0, -99.0]
    assert adjusted(logit_bias={1: 2}) == [2.0, 1.0, 0.5, 3.0, -2.0, 1.0]  # whole numbers too


def test_repetition_penalty_shrinks_every_token_of_prompt_and_output_towards_unlikely():
    # Seen: 1 and 4 (prompt), 3 and 2 (output). Positive logits are divided, negative ones multiplied.
    assert adjusted(repetition_penalty=2.0) == [2.0, -2.0, 0.25, 1.5, -4.0, 1.0]


def test_frequency_and_presence_penalties_count_only_generated_tokens():
    # Output counts: token 3 twice, token 2 once; the prompt's tokens are not penalised.
    assert adjusted(frequency_penalty=0.5) == [2.0, -1.0, 0.0, 2.0, -2.0, 1.0]
    assert adjusted(presence_penalty=0.5) == [2.0, -1.0, 0.0, 2.5, -2.0, 1.0]
    assert adjusted(frequency_penalty=-1.0, presence_penalty=1.0) == [2.0, -1.0, 0.5, 4.0, -2.0, 1.0]


def test_a_history_updated_step_by_step_counts_each_generated_token_once():
    history = TokenHistory(prompt_token_ids=[1, 4], vocab_size=6)
    for output in ([3], [3, 3], [3, 3], [3, 3, 2]):  # one step added nothing (a chunk that sampled no token)
        history.update(output)
    assert history.output_counts.tolist() == HISTORY[0].output_counts.tolist() == [0, 0, 1, 2, 0, 0]
    assert history.in_prompt.tolist() == [False, True, False, False, True, False]
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.5)]
    assert torch.equal(adjust_logits(ROW, params, [history]), adjust_logits(ROW, params, HISTORY))


def test_min_tokens_holds_back_the_ending_tokens_until_enough_are_generated():
    history = TokenHistory(prompt_token_ids=[1], vocab_size=6, end_token_ids=[3, 5, 99])  # 99: outside the vocab
    params = [SamplingParams(temperature=0, min_tokens=2)]
    assert adjust_logits(ROW, params, [history]).tolist() == [[2.0, -1.0, 0.5, -math.inf, -2.0, -math.inf]]
    assert Sampler()(ROW, params, [None], [history.update([0])]).token_ids == [0]  # one token in: still held
    assert torch.equal(adjust_logits(ROW, params, [history.update([0, 0])]), ROW)  # two: free to end


def test_allowed_token_ids_ban_every_other_token():
    history = TokenHistory(prompt_token_ids=[1], vocab_size=6, allowed_token_ids=[0, 2])
    params = [SamplingParams(temperature=0, allowed_token_ids=[0, 2])]
    assert adjust_logits(ROW, params, [history]).tolist() == [[2.0, -math.inf, 0.5, -math.inf, -math.inf, -math.inf]]
    assert Sampler(seed=0)(ROW.repeat(50, 1), [replace(params[0], temperature=5.0)] * 50, [None] * 50,
                           [history] * 50).token_ids.count(1) == 0


def test_a_bad_word_bans_its_last_token_where_the_output_ends_with_the_rest():
    # Bad words as token ids: (3,) always banned; (2, 5) and (2, 4) ban 5 and 4 right after a generated 2, and
    # (0, 2, 1) bans 1 after 0, 2.
    history = TokenHistory(prompt_token_ids=[0, 2], vocab_size=6, bad_words=[(3,), (2, 5), (2, 4), (0, 2, 1)])
    params = [SamplingParams(temperature=0, bad_words=("the history holds them as ids",))]
    inf = math.inf
    assert adjust_logits(ROW, params, [history]).tolist() == [[2.0, -1.0, 0.5, -inf, -2.0, 1.0]]  # not the prompt's
    assert adjust_logits(ROW, params, [history.update([2])]).tolist() == [[2.0, -1.0, 0.5, -inf, -inf, -inf]]
    assert adjust_logits(ROW, params, [history.update([2, 0, 2])]).tolist() == [[2.0, -inf, 0.5, -inf, -inf, -inf]]
    assert adjust_logits(ROW, params, [history.update([2, 0, 2, 0])]).tolist() == [[2.0, -1.0, 0.5, -inf, -2.0,
                                                                                    1.0]]


def test_min_p_keeps_only_tokens_near_the_likeliest():
    # After temperature 1, tokens 0 (e^-1 = 0.37 of the top) and 3 (the top) pass min_p 0.3; 5 (0.14) does not.
    rows = ROW.repeat(400, 1)
    out = Sampler(seed=0)(rows, [SamplingParams(temperature=1.0, min_p=0.3)] * 400, [None] * 400)
    assert set(out.token_ids) == {0, 3}
    hot = Sampler(seed=0)(rows, [SamplingParams(temperature=5.0, min_p=0.3)] * 400, [None] * 400)
    assert {2, 5} <= set(hot.token_ids)  # a higher temperature flattens the distribution first, as in vLLM


def test_penalties_steer_greedy_and_sampled_choices_but_not_the_reported_logprobs():
    raw = ROW.repeat(2, 1)
    params = [SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=1),
              SamplingParams(temperature=1.0, top_k=1, logit_bias={4: 10.0}, logprobs=1)]
    out = Sampler(seed=0)(raw, params, [None, None], HISTORY * 2)
    assert out.token_ids == [0, 4]  # token 3 penalised below token 0; token 4 lifted above all
    assert out.logprobs[0][0] == pytest.approx(ROW.log_softmax(-1)[0, 0].item())
    assert out.logprobs[1][3] == pytest.approx(ROW.log_softmax(-1)[0, 3].item())  # the raw best is still reported


def test_rows_without_penalties_are_left_as_they_are():
    logits = rand_logits(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=2.0),
              SamplingParams(temperature=0)]
    history = [None, TokenHistory([1], vocab_size=50).update([int(logits[1].argmax())]), None]
    out = adjust_logits(logits, params, history)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2]) and not torch.equal(out[1], logits[1])
    assert adjust_logits(logits, [SamplingParams(temperature=0)] * 3, None) is logits  # nothing to adjust: no copy


def test_penalties_need_the_token_history():
    with pytest.raises(ValueError, match="history"):
        Sampler(seed=0)(ROW, [SamplingParams(presence_penalty=1.0)], [None])
    with pytest.raises(ValueError, match="history"):
        Sampler(seed=0)(ROW, [SamplingParams(presence_penalty=1.0)], [None], [None])


@pytest.mark.parametrize("params, field", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    (dict(allowed_token_ids=[-1]), "allowed_token_ids"),
    (dict(bad_words=[" "]), "bad_words"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
])
def test_out_of_range_penalties_and_biases_name_their_field(params, field):
    with pytest.raises(InvalidRequestError) as refused:
        SamplingParams(**params)
    assert refused.value.field == field


def test_verified_guesses_leave_each_sampled_token_with_its_own_distribution():
    """Speculative decoding's check of a sampled request: a guess is kept with the probability the distribution
    gives it, else a token is drawn from the rest; the first token follows row 0's distribution whatever the guess,
    and the token after a kept guess follows row 1's."""
    rows = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0], [0.0, 1.5, -1.0, 0.5, 2.0, -0.5]])
    params, sampler = SamplingParams(temperature=1.0), Sampler(seed=0)
    for guess in (3, 4):  # the likeliest token, and an unlikely one
        yielded = [sampler.verify(rows, params, None, [guess]) for _ in range(4000)]
        assert chi_square([tokens[0] for tokens in yielded], rows[0].softmax(-1)) < 25.0  # 5 dof: p < 1e-3
        assert all(tokens[0] == guess for tokens in yielded if len(tokens) == 2)
    after = [tokens[1] for tokens in (sampler.verify(rows, params, None, [3]) for _ in range(4000)) if len(tokens) == 2]
    assert len(after) == pytest.approx(4000 * rows[0].softmax(-1)[3].item(), rel=0.1)  # kept as often as drawn
    assert chi_square(after, rows[1].softmax(-1)) < 25.0
    greedy = SamplingParams(temperature=0.0)
    assert sampler.verify(rows, greedy, None, [3]) == [3, 4] and sampler.verify(rows, greedy, None, [0]) == [3]


def test_a_seeded_requests_verified_tokens_come_from_its_own_generator():
    rows = rand_logits(3, 50)
    params = SamplingParams(temperature=1.0, seed=9)
    draws = [Sampler().verify(rows, params, make_generator(9), [7, 8]) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
