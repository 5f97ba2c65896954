"""What the engine hands back per request, in the shape vLLM users know (`out.outputs[0].text`)."""

from dataclasses import dataclass, field


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
    finish_reason: str | None = None  # "stop" | "length" | "abort", None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None
    delta_text: str = ""  # text released by this update only: what a stream sends
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


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

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), self.num_cached_tokens, len(self.outputs[0].token_ids))
