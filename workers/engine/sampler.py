"""Turns a batch of next-token logits into one token per row, each row under its own SamplingParams.

Bans, biases, penalties and min_tokens adjust a row's logits first (SamplingParams says which, in vLLM's order), for
greedy rows too, and a structured output's grammar masks the tokens it cannot take; logprobs are of the
unadjusted logits, as vLLM reports them.

Sampling uses the exponential race, argmax(probs / q) with q ~ Exp(1), which picks token i with probability
probs[i] and needs no cumulative sum. Its noise is one [V] draw per row, so a seeded request can take that draw
from its own generator: its tokens then depend on nothing else in the batch, not its neighbours, not its row.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from workers.engine.sampling_params import SamplingParams
from workers.engine.speculative import accept
from workers.engine.structured_output import apply_token_bitmask


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator owned by one seeded request; it must live as long as the request so its draws continue."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # {token_id: logprob} for the top-N tokens plus the chosen one, or None where logprobs were not asked for.
    logprobs: list[dict[int, float] | None]


def _is_top_k_on(params: SamplingParams, vocab_size: int) -> bool:
    return 0 < params.top_k < vocab_size


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks with -inf what each row's top-k and top-p exclude; one sort serves every row whatever its k and p.

    A row with top_k == V and top_p == 1 keeps everything. Ties at the k-th value are all kept, and the single
    most likely token always survives top-p, so no row is left empty.
    """
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending: the best token is last
    kth_best = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_best, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside_p = cumulative <= (1.0 - top_p).unsqueeze(1)
    outside_p[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class TokenHistory:
    """What a row's bans, penalties and min_tokens look at: the tokens of its prompt and how often it generated
    each, kept on the logits' device for the life of its request and brought up to date with each step's new
    tokens, so that a long context costs the penalties no work per step. `end_token_ids` are the tokens that would
    end the request (EOS, its stop token ids), which min_tokens holds back; `allowed_token_ids` (none: all) and
    `bad_words` (token id sequences) are its params' bans."""

    def __init__(self, prompt_token_ids: list[int], vocab_size: int, device: torch.device | str = "cpu",
                 end_token_ids: Iterable[int] = (), allowed_token_ids: Iterable[int] = (),
                 bad_words: Iterable[tuple[int, ...]] = ()):
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.in_prompt[torch.tensor(prompt_token_ids, dtype=torch.long, device=device)] = True
        self.output_counts = torch.zeros(vocab_size, device=device)
        self.num_counted = 0
        self.end_token_ids = torch.tensor(sorted(t for t in end_token_ids if t < vocab_size), dtype=torch.long,
                                          device=device)
        # Tokens never to take: those allowed_token_ids leaves out, and one-token bad words. A longer bad word bans
        # its last token only after its others: kept as {those tokens: [last tokens]}, looked up by the output's
        # tail, so a step costs a lookup per distinct length rather than a comparison per word.
        allowed, single, self._endings = list(allowed_token_ids), [], {}
        for word in bad_words:
            if len(word) == 1:
                single.append(word[0])
            else:
                self._endings.setdefault(tuple(word[:-1]), []).append(word[-1])
        self._prefix_lengths = sorted({len(prefix) for prefix in self._endings})
        self.banned: torch.Tensor | None = None
        if allowed or single:
            self.banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if allowed:
                self.banned[:] = True
                self.banned[torch.tensor(allowed, dtype=torch.long, device=device)] = False
            self.banned[torch.tensor(single, dtype=torch.long, device=device)] = True
        self.output_tail: list[int] = []  # the last tokens generated, as many as the longest bad word's prefix

    def update(self, output_token_ids: list[int]) -> "TokenHistory":
        """Counts the tokens generated since the last update (the output only ever grows)."""
        new = output_token_ids[self.num_counted:]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=self.output_counts.device)
            self.output_counts.index_add_(0, ids, torch.ones(len(new), device=ids.device))
            self.num_counted = len(output_token_ids)
            if self._prefix_lengths:
                self.output_tail = output_token_ids[-self._prefix_lengths[-1]:]
        return self

    def bad_word_endings(self) -> list[int]:
        """The tokens that would complete a bad word of more than one token now: those whose others end the
        output."""
        tail = self.output_tail
        return [token for n in self._prefix_lengths if n <= len(tail)
                for token in self._endings.get(tuple(tail[len(tail) - n:]), ())]


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams],
                  history: list[TokenHistory | None] | None) -> torch.Tensor:
    """The logits after each row's bans, logit bias and penalties; the same tensor when no row has any."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    if history is None or len(history) != len(params) or any(history[i] is None for i in rows):
        raise ValueError("penalties need each row's token history")
    logits = logits.clone()
    device = logits.device
    for i in rows:
        p, row, h = params[i], logits[i], history[i]
        if h.banned is not None:
            row.masked_fill_(h.banned, float("-inf"))
        endings = h.bad_word_endings()
        if endings:
            row[endings] = float("-inf")
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias)
            row.index_add_(0, torch.tensor(ids, device=device), torch.tensor(biases, dtype=row.dtype, device=device))
        if p.repetition_penalty != 1.0:
            seen = h.in_prompt | (h.output_counts > 0)
            row.copy_(torch.where(seen, torch.where(row > 0, row / p.repetition_penalty,
                                                    row * p.repetition_penalty), row))
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            counts = h.output_counts.to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if h.num_counted < p.min_tokens:
            row[h.end_token_ids] = float("-inf")
    return logits


class Sampler:
    """Stateless apart from the generators of unseeded rows, which it owns (one per device)."""

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._default_generators: dict[torch.device, torch.Generator] = {}

    def _default_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._default_generators:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._default_generators[device] = generator
        return self._default_generators[device]

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        history: list[TokenHistory | None] | None = None,
        allowed: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """`history` (one per row) is needed when a row's params adjust its logits; `allowed`, a bitmask of the
        tokens each row may take (structured_output.token_bitmask), when a row has a structured output."""
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
            raise ValueError(
                f"logits must be [B, V] with one SamplingParams and one generator slot per row; got logits "
                f"{tuple(logits.shape)}, {len(params)} params, {len(generators)} generators"
            )
        logits = logits.float()
        adjusted = adjust_logits(logits, params, history)
        if allowed is not None:
            adjusted = apply_token_bitmask(adjusted.clone() if adjusted is logits else adjusted, allowed)
        tokens = adjusted.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            picked = self._sample(
                adjusted.index_select(0, rows),
                [params[i] for i in sampled_rows],
                [generators[i] for i in sampled_rows],
            )
            tokens = tokens.index_copy(0, rows, picked)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(logits, params, token_ids))

    def verify(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               guesses: list[int]) -> list[int]:
        """The tokens one sequence's step yields from its rows' logits: a row for its next token and one after each
        guess (speculative.py). Each row's token is drawn as one token per step would draw it, from the row's
        distribution with the next row of the request's noise, and the guesses are kept while they equal those
        draws; the first draw that differs, or the one after the last guess, ends the step. A guess is certain, not
        drawn, so it is kept with the probability the distribution gives it, as rejection sampling keeps it, and
        the token that replaces it is the distribution's without it; and a seeded request draws exactly the tokens
        it would draw one per step (greedy: the model's picks), so guessing changes none of them, nor what a
        continuation elsewhere draws after them."""
        logits = logits.float()
        if params.greedy:
            return accept(guesses, logits.argmax(dim=-1).tolist())
        probs = self._probs(logits, [params] * logits.shape[0])
        generator = generator or self._default_generator(logits.device)
        drawn = [self._draw(probs[0], generator)]
        for guess, row in zip(guesses, probs[1:]):
            if drawn[-1] != guess:
                break
            drawn.append(self._draw(row, generator))
        return drawn

    @staticmethod
    def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
        """One token from a row of (unnormalised) probabilities, by the exponential race on the generator's noise."""
        noise = _row_noise(probs.shape[0], generator).to(probs.device)
        return int((probs / _nonzero(noise)).argmax())

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        num_rows, vocab_size = logits.shape
        probs = self._probs(logits, params)
        noise = self._noise(num_rows, vocab_size, logits.device, generators)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Each row's distribution after temperature, min_p, top-k and top-p."""
        vocab_size = logits.shape[1]
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature.unsqueeze(1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            probs = logits.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        # The sort behind the filters costs more than everything else here, so skip it when no row filters.
        if any(_is_top_k_on(p, vocab_size) or p.top_p < 1.0 for p in params):
            top_k = torch.tensor(
                [p.top_k if _is_top_k_on(p, vocab_size) else vocab_size for p in params], device=device
            )
            top_p = torch.tensor([p.top_p for p in params], device=device)
            logits = apply_top_k_top_p(logits, top_k, top_p)
        return logits.softmax(dim=-1)

    @staticmethod
    def skip_draw(vocab_size: int, generator: torch.Generator) -> None:
        """Consumes the noise of one sampled token from a seeded request's generator, as `_noise` draws it."""
        _row_noise(vocab_size, generator)

    def _noise(
        self, num_rows: int, vocab_size: int, device: torch.device, generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Exp(1) noise; a seeded row's comes from its generator alone, on that generator's own device."""
        noise = torch.empty(num_rows, vocab_size, device=device)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            draw = torch.empty(len(unseeded), vocab_size, device=device)
            draw.exponential_(generator=self._default_generator(device))
            noise[unseeded] = draw
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i] = _row_noise(vocab_size, generator).to(device)
        return _nonzero(noise)

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, params: list[SamplingParams], token_ids: list[int]
    ) -> list[dict[int, float] | None]:
        """From the raw logits, before temperature and filters, as vLLM reports them."""
        out: list[dict[int, float] | None] = [None] * len(params)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return out
        rows = torch.tensor(wanted, device=logits.device)
        found = top_logprobs(logits.index_select(0, rows), [token_ids[i] for i in wanted],
                             [params[i].logprobs for i in wanted])
        for i, row in zip(wanted, found):
            out[i] = row
        return out


def _row_noise(vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """One row of Exp(1) noise from a request's own generator, on that generator's device: every draw a seeded
    request makes (sampling a token, skipping one another group sampled, verifying a guess) takes this shape, so
    its generator advances the same way whichever path drew."""
    return torch.empty(vocab_size, device=generator.device).exponential_(generator=generator)


def _nonzero(noise: torch.Tensor) -> torch.Tensor:
    """Noise ready to divide by: an exact zero would turn a zero-probability token into nan or a winner; it is rare
    enough that raising it to the smallest positive float does not bias the race."""
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def top_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[dict[int, float]]:
    """{token id: log-probability} of each row's num_top likeliest tokens and of its own token, from raw logits."""
    logprobs = logits.float().log_softmax(dim=-1)
    top_values, top_ids = logprobs.topk(min(max(num_top), logprobs.shape[-1]), dim=-1)
    chosen = torch.tensor(token_ids, device=logits.device)
    chosen_values = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    rows = []
    for j, n in enumerate(num_top):
        row = dict(zip(top_ids[j][:n], top_values[j][:n]))
        row.setdefault(token_ids[j], chosen_values[j])
        rows.append(row)
    return rows
