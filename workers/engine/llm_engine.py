"""The engine loop: add requests, step, read outputs.

`step()` is the whole story: schedule, run the model once, advance every sequence's computed tokens, cache the
blocks that became full, and turn sampled tokens into text and finish decisions.
"""

import logging
import threading
import time
from collections.abc import Container
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, GenerationConfig

from workers.engine.adapter_cache import AdapterCache
from workers.engine.block_manager import BlockManager, KVEventSink
from workers.engine.config import EngineConfig
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    KVCacheFullError,
    PromptTooLongError,
)
from workers.engine.handoff import KVHandoff, ReceivePlan
from workers.engine.model_runner import ModelRunner, SampledToken
from workers.engine.outputs import CompletionOutput, Continuation, RequestMetrics, RequestOutput
from workers.engine.parallel import TensorParallel
from workers.engine.recent_prefixes import Prefix, RecentPrefixes
from workers.engine.sampling_params import SamplingParams, StructuredOutput
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import FinishReason, Sequence
from workers.engine.speculative import guess, takes_guesses
from workers.engine.step_plan import Stop
from workers.engine.structured_output import GrammarCompiler, RequestGrammar
from workers.engine.validation import (
    bad_words_token_ids,
    check_embedding_request,
    check_request,
    prompt_token_ids,
    truncate_prompt,
)
from workers.kv.hashing import BlockHash
from workers.kv_commands import KVCommand, OpenChannel, TransferCommand, TransferPlan, TransferRefused
from workers.kv_transfer import KVEndpoint, run_transfer

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    released_text: str = ""
    num_released_tokens: int = 0
    prefill_only: bool = False
    continuation: Continuation | None = None  # what a group that lost the request had streamed


@dataclass
class _Pinned:
    """A prefilled request's blocks, held for a decode group until `expiry` (time.monotonic())."""

    seq: Sequence
    metrics: RequestMetrics
    expiry: float
    claimed: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = False, tp: TensorParallel = TensorParallel(),
                 kv_events: KVEventSink | None = None):
        """Under tensor parallelism this is rank 0's engine: it schedules for the whole group and its runner
        drives the other ranks, which run workers/engine/follower.py. `kv_events` hears of every block hash the
        prefix cache gains or loses (workers/kv_events.py publishes them for the routers)."""
        self.config = config
        self.tp = tp
        self.runner = ModelRunner(config, progress, tp)
        model_dir = self.runner.model_dir
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.hf_config.vocab_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eos_token_ids = _eos_token_ids(model_dir, self.tokenizer)
        self._grammar_compiler: GrammarCompiler | None = None  # built by the first structured output
        self._grammar_compiler_lock = threading.Lock()
        self.kv = KVEndpoint(tp.rank, self.runner.device, config.cache.max_kv_channels,
                             config.cache.kv_transfer_timeout_s)
        self.block_size = config.cache.block_size
        self.block_manager = BlockManager(self.runner.num_kv_blocks, self.block_size,
                                          config.cache.enable_prefix_caching, kv_events, self.runner.num_host_blocks)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        # The tokens behind the cached chains: a group that is scaled down hands its own prefixes on by them.
        self.recent_prefixes = RecentPrefixes(self.block_size, (self.runner.num_kv_blocks +
                                                                self.runner.num_host_blocks) * self.block_size)
        # A sequence may never outgrow the whole cache: alone, it must always fit.
        self.max_seq_len = min(self.max_model_len, self.runner.num_kv_blocks * self.block_size)
        self.requests: dict[str, _Request] = {}
        self.adapters = AdapterCache(self.runner, config.model.max_loras)  # those requests bring (lora_path)
        # Prefill role: finished prompts whose blocks stay pinned until a decode group has them (or the lease ends).
        self.pinned: dict[str, _Pinned] = {}
        # Decode role: requests whose blocks are allocated and whose KV is on its way from a prefill group.
        self.receiving: dict[str, Sequence] = {}
        self.num_transfer_failures = 0  # decode role: prompts recomputed because their KV did not arrive
        # Running totals over finished requests, for metrics: the prefix cache's hit rate is cached / prompt.
        self.num_finished = 0
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0
        # Running totals over steps, for the autoscaler: prompt tokens computed (chunks, not cache hits), the
        # steps run and the seconds they took.
        self.num_computed_prompt_tokens = 0
        self.num_generated_tokens = 0  # tokens appended to sequences (a prefill group's first tokens too)
        self.num_steps = 0
        self.step_seconds = 0.0
        # Speculative decoding's running totals: guesses computed, and those the model agreed with.
        self.num_guessed_tokens = 0
        self.num_accepted_guesses = 0
        self._ids = count()
        logger.info("engine ready: %s, %d KV blocks, context %d", model_dir.name, self.runner.num_kv_blocks,
                    self.max_model_len)
        if config.speculative.num_speculative_tokens and self.runner.decode_graphs is not None:
            logger.warning("speculative decoding: a step with guesses runs eagerly, outside the decode CUDA graphs, "
                           "which can cost more than the guesses save; measure before serving with it")

    def add_lora(self, name: str, folder: str) -> None:
        """Loads a LoRA adapter that requests may then name (SamplingParams.lora), between steps, for the
        engine's life."""
        self.runner.add_lora(name, folder)

    def load_adapter(self, name: str, folder: str) -> None:
        """Loads an adapter as the first request naming it with its folder does (adapter_cache.py): how a cluster
        checks an adapter it is asked to load while it runs, on a group of the model itself."""
        self.adapters.use(name, folder, self._adapters_in_use)

    @property
    def num_lora_adapters(self) -> int:
        return len(self.runner.lora.names) if self.runner.lora is not None else 0

    def _adapters_in_use(self) -> set[str]:
        return {req.seq.lora for req in self.requests.values() if req.seq.lora is not None}

    # -- requests ---------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None,
                    prefill_only: bool = False, grammar: "CompiledGrammar | None" = None,
                    continuation: Continuation | None = None) -> str:
        """Queues a request. With `prefill_only` (the prefill role) it ends after its first token with reason
        "prefilled", its final output carrying the handoff, and its blocks stay pinned until `release_pinned`, or
        for kv_claim_s and after `claim_pinned` for kv_lease_s. `grammar` is the request's structured output as
        `compile_grammar` returned it; without it, the grammar is compiled here. With `continuation` the request
        takes over from a group that was lost while running it: its outputs carry on from what that group had
        streamed."""
        req = self._new_request(prompt, params, request_id, cache_salt, grammar, continuation)
        req.prefill_only = prefill_only
        self.scheduler.add(req.seq)
        return req.seq.request_id

    def add_embedding_request(self, prompt: str | list[int], request_id: str | None = None,
                              cache_salt: str | None = None, lora: str | None = None,
                              lora_path: str | None = None) -> str:
        """Queues an embedding request: its prompt is computed as any other's (in chunks, from the prefix cache,
        leaving its blocks there) and its final output carries the prompt's embedding (RequestOutput.embedding,
        model_runner.py's last-token pooling) instead of a token. `lora` and `lora_path` as SamplingParams'."""
        req = self._new_request(prompt, SamplingParams(max_tokens=1, lora=lora, lora_path=lora_path), request_id,
                                cache_salt, embed=True)
        self.scheduler.add(req.seq)
        return req.seq.request_id

    def _new_request(self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None,
                     cache_salt: str | None, grammar: "CompiledGrammar | None" = None,
                     continuation: Continuation | None = None, embed: bool = False) -> _Request:
        params = params or SamplingParams()
        if not embed and not self.runner.model.generates:
            kind = "a classifier (its checkpoint has a classification head): it serves classifications" \
                if self.runner.model.score is not None else \
                "an embedding model (its checkpoint has no language-model head): it serves embeddings"
            raise InvalidRequestError("model", f"{self.runner.model_dir.name} is {kind} only")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests or request_id in self.pinned:
            raise DuplicateRequestError(f"request id {request_id!r} is already in flight")
        prompt_text, token_ids = prompt_token_ids(self.tokenizer, prompt, self.vocab_size)
        kept = truncate_prompt(token_ids, params, self.max_model_len)
        if len(kept) < len(token_ids):
            prompt_text, token_ids = None, kept  # the text would no longer be the prompt the model saw
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        if params.lora_path is not None:
            self.adapters.use(params.lora, params.lora_path, self._adapters_in_use)
        self._validate(token_ids, params, ends, embed)
        seq = Sequence(request_id, token_ids, params, self.block_size, cache_salt, frozenset(ends),
                       bad_words=bad_words_token_ids(self.tokenizer, params, self.vocab_size), embed=embed)
        if params.structured_output is not None:
            spec = params.structured_output
            seq.grammar = RequestGrammar(grammar or self.compile_grammar(spec), spec.after, spec.opener)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        req = _Request(seq, prompt_text, detok, RequestMetrics(time.monotonic()))
        if continuation is not None:
            self._continue(req, continuation)
        self.requests[request_id] = req
        return req

    def _continue(self, req: _Request, continuation: Continuation) -> None:
        """Makes `continuation`'s tokens the request's output so far, as if this engine had generated and streamed
        them: the scheduler then computes their KV with the prompt's, as after a preemption."""
        seq, params = req.seq, req.seq.sampling_params
        generated = continuation.token_ids
        if len(generated) >= params.max_tokens or seq.num_tokens + len(generated) >= self.max_seq_len:
            raise InvalidRequestError("continuation", f"{len(generated)} generated tokens leave no room for another "
                                                      f"(max_tokens {params.max_tokens}, prompt {seq.num_tokens})")
        bad = next((t for t in generated if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("continuation", f"token id {bad} is outside the vocabulary "
                                                      f"[0, {self.vocab_size})")
        if params.logprobs is not None and len(continuation.logprobs or ()) != len(generated):
            raise InvalidRequestError("continuation", "logprobs must have one entry per generated token")
        if not req.detokenizer.resume(generated, continuation.text):
            raise InvalidRequestError("continuation", "text is not the text of its token ids")
        for token_id in generated:
            seq.append_token(token_id)
            self.runner.skip_draw(seq)  # a seeded request's next token comes from the draw after theirs
        if params.logprobs is not None:
            seq.logprobs = list(continuation.logprobs)
        req.released_text, req.num_released_tokens = continuation.text, len(generated)
        req.continuation = continuation

    def compile_grammar(self, spec: StructuredOutput) -> "CompiledGrammar":
        """A structured output's grammar, compiled against this engine's vocabulary. Callable from any thread:
        servers compile on another, as a large grammar takes seconds the other requests must not wait."""
        with self._grammar_compiler_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._grammar_compiler.compile(spec)

    # -- prefill role -----------------------------------------------------------------------------------------

    def _handoff(self, req: _Request) -> KVHandoff:
        """What a decode group needs to continue a prefilled request, blocks included by id: the KV of every
        token but the one sampled here (the prompt's, and a continuation's)."""
        seq, metrics = req.seq, req.metrics
        num_kv_tokens = seq.num_tokens - 1
        return KVHandoff(
            request_id=seq.request_id, prompt_token_ids=list(seq.prompt_token_ids), first_token=seq.token_ids[-1],
            first_logprobs=seq.logprobs[-1] if seq.logprobs else None, num_cached_tokens=seq.num_cached_tokens,
            block_ids=seq.block_table[:-(-num_kv_tokens // self.block_size)],
            block_hashes=seq.block_hashes[:num_kv_tokens // self.block_size], cache_salt=seq.cache_salt,
            source=self.kv.address(), prefill_queue_s=metrics.first_scheduled_time - metrics.arrival_time,
            prefill_compute_s=metrics.first_token_time - metrics.first_scheduled_time,
            continuation=req.continuation)

    def claim_pinned(self, request_id: str) -> None:
        """The handoff reached its receiver: keep the blocks for the whole lease. A claim that comes after the
        decode group took them (or the claim window ended) finds nothing to claim."""
        pinned = self.pinned.get(request_id)
        if pinned is not None:
            pinned.expiry, pinned.claimed = time.monotonic() + self.config.cache.kv_lease_s, True

    def release_pinned(self, request_id: str) -> None:
        """The decode group has the KV (or the request was aborted): unpin and free the blocks."""
        pinned = self.pinned.pop(request_id, None)
        if pinned is not None:
            self.block_manager.free(pinned.seq)

    def next_lease_expiry(self) -> float | None:
        """When the earliest pinned request's lease ends (time.monotonic()), None if nothing is pinned."""
        return min((pinned.expiry for pinned in self.pinned.values()), default=None)

    def expire_leases(self) -> None:
        now = time.monotonic()
        for request_id, pinned in [(rid, p) for rid, p in self.pinned.items() if p.expiry <= now]:
            if pinned.claimed:
                logger.warning("lease on %s expired before a decode group fetched its KV; freeing its blocks",
                               request_id)
            else:
                logger.info("nobody claimed %s's handoff (its caller left while the prefill call was on its way); "
                            "freeing its blocks", request_id)
            self.release_pinned(request_id)

    # -- decode role ------------------------------------------------------------------------------------------

    def add_prefilled_request(self, handoff: KVHandoff, params: SamplingParams | None = None,
                              grammar: "CompiledGrammar | None" = None) -> ReceivePlan:
        """Allocates blocks for a prompt (and a continuation) whose KV comes from a prefill group and says which
        blocks to receive: blocks this group already holds in its prefix cache are shared, and those its host tier
        holds copied back, rather than sent again. `grammar` as for add_request."""
        req = self._new_request(handoff.prompt_token_ids, params, handoff.request_id, handoff.cache_salt, grammar,
                                handoff.continuation)
        seq = req.seq
        hits = self.block_manager.get_computed_blocks(seq)
        reloaded = self.block_manager.get_offloaded_blocks(seq, len(hits))
        held = len(hits) + len(reloaded)
        if not self.block_manager.allocate_slots(seq, seq.num_tokens - held * self.block_size, hits, reloaded):
            del self.requests[seq.request_id]
            raise KVCacheFullError(f"no free KV blocks for the {seq.num_tokens}-token prompt of {seq.request_id}")
        # Usage reports the prompt tokens the cluster did not compute: the prefill group's cache hits, or the
        # blocks this group already held if it had more.
        seq.num_cached_tokens = min(max(held * self.block_size, handoff.num_cached_tokens), seq.num_prompt_tokens)
        self.receiving[seq.request_id] = seq
        return ReceivePlan(seq.request_id, held, handoff.block_ids[held:], seq.block_table[held:])

    def plan_transfer(self, handoff: KVHandoff, plan: ReceivePlan) -> TransferPlan:
        """The prefill group's and this group's halves of moving `plan`'s blocks, over the open channel to the
        prefill group or, first, a new one."""
        peer = f"{handoff.source.host}:{handoff.source.port}"
        name, must_open = self.kv.channel_for(peer)
        rid = handoff.request_id
        send = TransferCommand("send", rid, self.kv.id, name, plan.src_block_ids)
        recv = TransferCommand("recv", rid, peer, name, plan.dst_block_ids)
        if not must_open:
            return TransferPlan(send, recv)
        return TransferPlan(send, recv, OpenChannel("send", self.kv.id, handoff.source, name),
                            OpenChannel("recv", peer, handoff.source, name))

    def transfer_kv(self, command: KVCommand) -> int:
        """Runs one half of a transfer on every rank of the group (rank r pairs with the peer's rank r); returns
        this rank's bytes. Raises TransferError, with the channel dropped on every rank, if any rank failed."""
        if isinstance(command, TransferCommand) and command.direction == "send" \
                and command.request_id not in self.pinned:
            # Refused before any rank starts: the blocks may already hold another request's KV.
            raise TransferRefused(f"{command.request_id} holds no pinned KV here (its lease expired or it was "
                                "aborted)")
        self._copy_blocks()
        if self.runner.followers is not None:
            self.runner.followers.send(command)
        return run_transfer(self.kv, command, self.runner.kv_caches, self.tp)

    def start_prefilled_request(self, handoff: KVHandoff) -> RequestOutput:
        """The KV has arrived: the request joins the running batch with its whole prompt (and continuation)
        computed, and its first token, sampled by the prefill group, is emitted here as if this group had sampled
        it."""
        seq = self.receiving.pop(handoff.request_id)
        metrics = self.requests[seq.request_id].metrics
        metrics.prefill_queue_s, metrics.prefill_compute_s = handoff.prefill_queue_s, handoff.prefill_compute_s
        seq.num_computed_tokens = seq.num_tokens
        self.block_manager.cache_full_blocks(seq)
        self.scheduler.add_running(seq)
        # A seeded request's next token must come from its generator's draw after the prefill group's, as in one
        # engine.
        self.runner.skip_draw(seq)
        return self._process(SampledToken(seq, handoff.first_token, handoff.first_logprobs))

    def recompute_prefilled_request(self, request_id: str) -> None:
        """The transfer failed: drop what arrived and compute the prompt here instead (same output)."""
        seq = self.receiving.pop(request_id)
        self.num_transfer_failures += 1
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        seq.num_cached_tokens = 0
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; returns its final output, None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            self.release_pinned(request_id)
            return None
        return self._finish(req, FinishReason.ABORT)

    def fail_request(self, request_id: str, error: str) -> RequestOutput | None:
        """End a request whose step raised: it frees everything like an abort and carries the error."""
        out = self.abort_request(request_id)
        if out is not None:
            out.error = error
        return out

    def unique_prefixes(self, held_elsewhere: Container[BlockHash]) -> list[Prefix]:
        """The recent prefixes whose cached blocks include some that no other group holds, most recent first."""
        return self.recent_prefixes.unique(self.block_manager, held_elsewhere)

    def shutdown(self) -> None:
        """Releases the follower ranks (they leave their loop) and closes KV channels."""
        if self.runner.followers is not None:
            self.runner.followers.send(Stop())
        self.kv.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self.expire_leases()
        self._guess()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        now = time.monotonic()
        for seq, num_new in sched.scheduled:
            metrics = self.requests[seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
            self.num_computed_prompt_tokens += max(0, min(num_new, seq.num_prompt_tokens - seq.num_computed_tokens))
        self._copy_blocks()
        sampled = self.runner.execute(sched.scheduled)
        accepted = {id(s.seq): len(s.more_token_ids) for s in sampled}
        for seq, num_new in sched.scheduled:
            # Of the guesses computed with the next token, only those the model agreed with hold KV to keep.
            guesses, agreed = len(seq.draft_token_ids), accepted.get(id(seq), 0)
            seq.num_computed_tokens += num_new - guesses + agreed
            self.num_guessed_tokens += guesses
            self.num_accepted_guesses += agreed
            seq.draft_token_ids.clear()
            self.block_manager.cache_full_blocks(seq)
        outputs = [self._process(s) for s in sampled]
        outputs += [self._embedded(seq) for seq, _ in sched.scheduled if seq.embedding is not None]
        self.num_steps += 1
        self.step_seconds += time.monotonic() - now
        return outputs

    def _copy_blocks(self) -> None:
        """Runs the copies to and from the host tier that the block manager decided since the last ones: before the
        step or transfer that would read or overwrite those blocks."""
        copies = self.block_manager.take_copies()
        if copies:
            self.runner.copy_blocks(copies)

    def _guess(self) -> None:
        """Guesses at the next tokens of each decoding sequence that can take them (speculative.py)."""
        config = self.config.speculative
        if not config.num_speculative_tokens:
            return
        for seq in self.scheduler.running:
            seq.draft_token_ids = guess(seq, config, self.max_seq_len) if takes_guesses(seq) else []

    def _process(self, sampled: SampledToken) -> RequestOutput:
        """The step's tokens of one sequence, in order, until one of them ends it."""
        seq = sampled.seq
        req = self.requests[seq.request_id]
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        for token_id, logprobs in zip([sampled.token_id, *sampled.more_token_ids],
                                      [sampled.logprobs, *sampled.more_logprobs]):
            ended = self._take(req, token_id, logprobs)
            if ended is not None:
                return ended
        return self._output(req, finished=False)

    def _embedded(self, seq: Sequence) -> RequestOutput:
        """An embedding request whose vector this step computed: it ends here."""
        req = self.requests[seq.request_id]
        req.metrics.first_token_time = time.monotonic()
        return self._finish(req, FinishReason.EMBEDDED)

    def _take(self, req: _Request, token_id: int, logprobs: dict[int, float] | None) -> RequestOutput | None:
        """Appends one token; the request's final output if that token ends it."""
        seq = req.seq
        seq.append_token(token_id)
        self.num_generated_tokens += 1
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if req.prefill_only:
            return self._finish(req, FinishReason.PREFILLED)
        params = seq.sampling_params
        # An EOS or stop token ends the request before it reaches the text, as in vLLM.
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return self._finish(req, FinishReason.STOP)
        if token_id in params.stop_token_ids:
            return self._finish(req, FinishReason.STOP, token_id)
        req.detokenizer.append(token_id)
        # As in vLLM, stop strings count from the token after the first min_tokens.
        stop_str = req.detokenizer.check_stop(search=seq.num_output_tokens > params.min_tokens)
        if stop_str is not None:
            return self._finish(req, FinishReason.STOP, stop_str)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            return self._finish(req, FinishReason.LENGTH)
        return None

    def _finish(self, req: _Request, reason: FinishReason, stop_reason: str | int | None = None) -> RequestOutput:
        keep_blocks = reason is FinishReason.PREFILLED
        seq = req.seq
        if self.block_manager.enable_prefix_caching:
            num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
            self.recent_prefixes.record(seq.token_ids, seq.block_hashes[:num_full], seq.cache_salt, seq.lora,
                                        seq.sampling_params.lora_path)
        self.scheduler.finish(seq, reason, free_blocks=not keep_blocks)
        self.receiving.pop(seq.request_id, None)
        if keep_blocks:
            claim_s = min(self.config.cache.kv_claim_s, self.config.cache.kv_lease_s)
            self.pinned[seq.request_id] = _Pinned(seq, req.metrics, time.monotonic() + claim_s)
        seq.stop_reason = stop_reason
        req.metrics.finished_time = time.monotonic()
        self.num_finished += 1
        self.num_prompt_tokens += seq.num_prompt_tokens
        self.num_cached_prompt_tokens += seq.num_cached_tokens
        self.runner.release(seq.request_id)
        del self.requests[seq.request_id]
        out = self._output(req, finished=True)
        if keep_blocks:
            out.handoff = self._handoff(req)
        return out

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        seq = req.seq
        first = req.num_released_tokens == 0
        delta = req.detokenizer.take_delta(finished)
        req.released_text += delta
        new_ids = seq.token_ids[seq.num_prompt_tokens + req.num_released_tokens:]
        req.num_released_tokens = seq.num_output_tokens
        completion = CompletionOutput(
            index=0, text=req.released_text, token_ids=seq.output_token_ids,  # a copy: the sequence grows on
            finish_reason=seq.finish_reason.value if finished and seq.finish_reason else None,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if seq.sampling_params.logprobs is not None else None,
            delta_text=delta, delta_token_ids=new_ids)
        prompt_logprobs = None
        if seq.sampling_params.prompt_logprobs is not None and (first or finished):
            prompt_logprobs = [None, *seq.prompt_logprobs]
        return RequestOutput(seq.request_id, req.prompt, seq.prompt_token_ids, [completion], finished,
                             seq.num_cached_tokens, req.metrics, prompt_logprobs=prompt_logprobs,
                             embedding=seq.embedding)

    # -- input checks -----------------------------------------------------------------------------------------

    def _validate(self, token_ids: list[int], params: SamplingParams, ends: set[int], embed: bool = False) -> None:
        """check_request's checks (check_embedding_request's for an embedding request, which generates nothing), and
        those that need this engine: its KV capacity and the tokens that end a request (`ends`)."""
        if embed:
            check_embedding_request(token_ids, self.max_model_len)
            if len(token_ids) > self.max_seq_len:
                raise PromptTooLongError(len(token_ids), self.max_seq_len, "the KV cache capacity")
        else:
            check_request(token_ids, params, self.vocab_size, self.max_model_len)
            if len(token_ids) >= self.max_seq_len:
                raise PromptTooLongError(len(token_ids), self.max_seq_len - 1, "the KV cache capacity")
        if params.priority and self.scheduler.config.policy != "priority":
            raise InvalidRequestError("priority", "this server runs requests in arrival order (scheduling_policy "
                                                  "fcfs); leave priority at 0")
        adapters = self.runner.lora.names if self.runner.lora is not None else ()
        if params.lora is not None and params.lora not in adapters:
            raise InvalidRequestError("lora", f"no LoRA adapter {params.lora!r} here; this engine serves "
                                              f"{', '.join(map(repr, adapters)) or 'none'} (lora_modules, or "
                                              "LLM.add_lora)")
        if params.min_tokens and params.allowed_token_ids and ends.issuperset(params.allowed_token_ids):
            raise InvalidRequestError("allowed_token_ids", "allows only tokens that end the request, which "
                                                           "min_tokens holds back")


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
