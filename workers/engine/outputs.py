"""What the engine hands back per request, in the shape vLLM users know (`out.outputs[0].text`).

Each output holds the whole request so far (its text, tokens and logprobs). Sent to another process as they are,
a long reply's stream would carry its tokens again with every new token, which grows with the square of its length
(a 4k-token reply with top-5 logprobs: 4 ms of pickling per token, on the engine's process): so a stream crosses
processes as deltas (`RequestOutput.as_delta`), each output with only what is new and the last one whole, and the
side that needs the whole of each output puts them back together (`DeltaAssembler`).
"""

from dataclasses import dataclass, field, replace

from workers.engine.handoff import KVHandoff


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    generated_tokens: int


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text released so far (final text once finished)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" ("prefilled", "embedded" inside the cluster)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None
    delta_text: str = ""  # text released by this update only: what a stream sends
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestMetrics:
    """When a request passed each stage in the engine that served it (time.monotonic() of that process, so only
    differences mean anything across processes)."""

    arrival_time: float
    first_scheduled_time: float | None = None  # its first prompt chunk ran
    first_token_time: float | None = None
    finished_time: float | None = None
    # A request prefilled by another group (disaggregated): that group's stages, and the KV's move here.
    prefill_queue_s: float | None = None
    prefill_compute_s: float | None = None
    kv_transfer_s: float = 0.0
    kv_transfer_bytes: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class TimeToFirstToken:
    """Where a request's time to first token went, in seconds, as the ingress reports it to the client."""

    total_s: float  # request received to first token, at the ingress
    router_queue_s: float  # the rest of total_s: validation, routing, Serve's queues and the hops between
    prefill_queue_s: float  # waiting in the prefilling group's scheduler
    prefill_compute_s: float  # the prompt's chunks and the first token
    kv_transfer_s: float = 0.0
    kv_transfer_bytes: int = 0
    first_decode_step_s: float = 0.0  # the decode group holding the KV to its first token leaving it

    @classmethod
    def of(cls, metrics: RequestMetrics, total_s: float) -> "TimeToFirstToken":
        first_token = metrics.first_token_time if metrics.first_token_time is not None else metrics.arrival_time
        if metrics.prefill_queue_s is None:  # this group prefilled the request itself
            scheduled = metrics.first_scheduled_time if metrics.first_scheduled_time is not None else first_token
            stages = dict(prefill_queue_s=scheduled - metrics.arrival_time, prefill_compute_s=first_token - scheduled)
        else:
            stages = dict(prefill_queue_s=metrics.prefill_queue_s, prefill_compute_s=metrics.prefill_compute_s,
                          kv_transfer_s=metrics.kv_transfer_s, kv_transfer_bytes=metrics.kv_transfer_bytes,
                          first_decode_step_s=max(0.0, first_token - metrics.arrival_time - metrics.kv_transfer_s))
        accounted = sum(v for k, v in stages.items() if k.endswith("_s"))
        return cls(total_s=total_s, router_queue_s=max(0.0, total_s - accounted), **stages)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics
    error: str | None = None  # set when the request failed inside the engine rather than finishing
    ttft: TimeToFirstToken | None = None  # set by the cluster's ingress on a request's first output
    # A prefilled request's (the prefill role) final output carries its handoff, made in the step that finished
    # it: fetching it afterwards would wait for the engine's next step, a second prefill chunk on a busy group.
    handoff: KVHandoff | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it).
    # Only the first and the last output carry them, so a stream does not resend them with every token.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # An embedding request's (LLMEngine.add_embedding_request) final output: the prompt's unit-length vector, or
    # where the model is a classifier, its logits per class.
    embedding: list[float] | None = None

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), self.num_cached_tokens, len(self.outputs[0].token_ids))

    def as_delta(self, first: bool) -> "RequestOutput":
        """This output as a stream sends it to another process: the new tokens, text and logprobs only, the prompt
        with the `first` output alone; a finished output goes whole (it is sent once, and readers of a stream's
        last output see everything)."""
        if self.finished:
            return self
        completion = self.outputs[0]
        logprobs = completion.logprobs
        if logprobs is not None:
            logprobs = logprobs[len(logprobs) - len(completion.delta_token_ids):]
        return replace(self, prompt=self.prompt if first else None,
                       prompt_token_ids=self.prompt_token_ids if first else [],
                       outputs=[replace(completion, text="", token_ids=[], logprobs=logprobs)])


@dataclass(frozen=True)
class Continuation:
    """What a request had streamed when the group running it was lost. The engine that takes it over
    (LLMEngine.add_request) counts these tokens as generated, for max_tokens, min_tokens, penalties, stop strings,
    the structured output and a seeded request's draws, and computes their KV with the prompt's: the rest is then
    what the lost group would have generated."""

    token_ids: list[int]
    text: str  # what the caller received; the lost group may have held back a tail that could begin a stop string
    logprobs: list[dict[int, float]] | None = None

    @classmethod
    def of(cls, out: "RequestOutput") -> "Continuation":
        completion = out.outputs[0]
        return cls(list(completion.token_ids), completion.text, completion.logprobs)


class DeltaAssembler:
    """One request's outputs put back together from its stream of `as_delta` outputs, as the engine made them."""

    def __init__(self):
        self._prompt: str | None = None
        self._prompt_token_ids: list[int] = []
        self._text = ""
        self._token_ids: list[int] = []
        self._logprobs: list[dict[int, float]] = []

    def add(self, out: RequestOutput) -> RequestOutput:
        if out.finished:
            return out
        if out.prompt_token_ids:
            self._prompt, self._prompt_token_ids = out.prompt, out.prompt_token_ids
        completion = out.outputs[0]
        self._text += completion.delta_text
        self._token_ids += completion.delta_token_ids
        if completion.logprobs is not None:
            self._logprobs += completion.logprobs
        whole = replace(completion, text=self._text, token_ids=list(self._token_ids),
                        logprobs=None if completion.logprobs is None else list(self._logprobs))
        return replace(out, prompt=self._prompt, prompt_token_ids=self._prompt_token_ids, outputs=[whole])
