"""The engine loop: add requests, step, read outputs.

`step()` is the whole story: schedule, run the model once, advance every sequence's computed tokens, cache the
blocks that became full, and turn sampled tokens into text and finish decisions.
"""

import logging
import time
from dataclasses import dataclass
from itertools import count

from transformers import AutoTokenizer, GenerationConfig

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.errors import DuplicateRequestError, InvalidRequestError, PromptTooLongError
from workers.engine.model_runner import ModelRunner, SampledToken, load_hf_config
from workers.engine.model_store import resolve_model
from workers.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from workers.engine.parallel import TensorParallel
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import FinishReason, Sequence

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    released_text: str = ""
    num_released_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = False, tp: TensorParallel = TensorParallel()):
        """Under tensor parallelism each rank builds its own engine with its `tp`: every rank runs this same
        deterministic scheduler on the same requests, so the ranks stay in lockstep without exchanging batches."""
        self.config = config
        model_dir = resolve_model(config.model.model)
        hf_config = load_hf_config(model_dir)
        self.max_model_len = min(config.model.max_model_len or hf_config.max_position_embeddings,
                                 hf_config.max_position_embeddings)
        self.vocab_size = hf_config.vocab_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eos_token_ids = _eos_token_ids(model_dir, self.tokenizer)
        self.runner = ModelRunner(config.model, config.cache, model_dir, hf_config, self.max_model_len, progress,
                                  tp)
        self.block_size = config.cache.block_size
        self.block_manager = BlockManager(self.runner.num_kv_blocks, self.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        # A sequence may never outgrow the whole cache: alone, it must always fit.
        self.max_seq_len = min(self.max_model_len, self.runner.num_kv_blocks * self.block_size)
        self.requests: dict[str, _Request] = {}
        self._ids = count()
        logger.info("engine ready: %s, %d KV blocks, context %d", model_dir.name, self.runner.num_kv_blocks,
                    self.max_model_len)

    # -- requests ---------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise DuplicateRequestError(f"request id {request_id!r} is already in flight")
        prompt_text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        seq = Sequence(request_id, token_ids, params, self.block_size, cache_salt)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        self.requests[request_id] = _Request(seq, prompt_text, detok, RequestMetrics(time.monotonic()))
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; returns its final output, None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, FinishReason.ABORT)

    def fail_request(self, request_id: str, error: str) -> RequestOutput | None:
        """End a request whose step raised: it frees everything like an abort and carries the error."""
        out = self.abort_request(request_id)
        if out is not None:
            out.error = error
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        sampled = self.runner.execute(sched.scheduled)
        for seq, num_new in sched.scheduled:
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)
        return [self._process(s) for s in sampled]

    def _process(self, sampled: SampledToken) -> RequestOutput:
        seq, token_id = sampled.seq, sampled.token_id
        req = self.requests[seq.request_id]
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        seq.append_token(token_id)
        if sampled.logprobs is not None:
            seq.logprobs.append(sampled.logprobs)
        params = seq.sampling_params
        # An EOS or stop token ends the request before it reaches the text, as in vLLM.
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return self._finish(req, FinishReason.STOP)
        if token_id in params.stop_token_ids:
            return self._finish(req, FinishReason.STOP, token_id)
        req.detokenizer.append(token_id)
        stop_str = req.detokenizer.check_stop()
        if stop_str is not None:
            return self._finish(req, FinishReason.STOP, stop_str)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            return self._finish(req, FinishReason.LENGTH)
        return self._output(req, finished=False)

    def _finish(self, req: _Request, reason: FinishReason, stop_reason: str | int | None = None) -> RequestOutput:
        self.scheduler.finish(req.seq, reason)
        req.seq.stop_reason = stop_reason
        req.metrics.finished_time = time.monotonic()
        self.runner.release(req.seq.request_id)
        del self.requests[req.seq.request_id]
        return self._output(req, finished=True)

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        seq = req.seq
        delta = req.detokenizer.take_delta(finished)
        req.released_text += delta
        new_ids = seq.output_token_ids[req.num_released_tokens:]
        req.num_released_tokens = seq.num_output_tokens
        completion = CompletionOutput(
            index=0, text=req.released_text, token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason.value if finished and seq.finish_reason else None,
            stop_reason=seq.stop_reason, logprobs=list(seq.logprobs) if seq.sampling_params.logprobs is not None else None,
            delta_text=delta, delta_token_ids=new_ids)
        return RequestOutput(seq.request_id, req.prompt, seq.prompt_token_ids, [completion], finished,
                             seq.num_cached_tokens, req.metrics)

    # -- input checks -----------------------------------------------------------------------------------------

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        if not token_ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequestError("prompt_token_ids", f"token id {t!r} is outside the vocabulary "
                                                              f"[0, {self.vocab_size})")
        return None, token_ids

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len - 1, "the model's context length minus "
                                                                            "one generated token")
        if len(token_ids) >= self.max_seq_len:
            raise PromptTooLongError(len(token_ids), self.max_seq_len - 1, "the KV cache capacity")
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise InvalidRequestError("logprobs", f"at most {MAX_LOGPROBS}, got {params.logprobs}")
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise InvalidRequestError("stop_token_ids", f"token id {t} is outside the vocabulary")


def _eos_token_ids(model_dir, tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return ids
    eos = gen.eos_token_id
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids
