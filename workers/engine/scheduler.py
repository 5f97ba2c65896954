"""Continuous batching: which sequences run in the next step, and how many new tokens each computes.

There is no prefill phase and decode phase. Every running sequence asks for `num_tokens - num_computed_tokens` new
tokens, capped by the step's token budget, so a long prompt is prefilled in chunks alongside other sequences'
decodes; a decoding sequence with guesses at its next tokens (speculative.py) asks for those too. Running sequences
go first; waiting ones are admitted while blocks, budget and seats last. When blocks run out, the newest running
sequence is preempted by recompute.

Under the "priority" policy both queues are kept in priority order (SamplingParams.priority, lower first; arrival
breaks ties): waiting sequences are admitted by it, running ones get the budget by it, and the one preempted is
the newest of the lowest priority. Under "fcfs" every sequence ranks alike, which is arrival order.
"""

from collections import deque
from dataclasses import dataclass, field

from workers.engine.block_manager import BlockManager
from workers.engine.config import SchedulerConfig
from workers.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, number of new tokens)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # a running total, exported as a metric

    def add(self, seq: Sequence) -> None:
        self._wait(seq)

    def _rank(self, seq: Sequence) -> int:
        return seq.sampling_params.priority if self.config.policy == "priority" else 0

    def _wait(self, seq: Sequence, again: bool = False) -> None:
        """Into the waiting queue behind those that rank before it or alike; `again` (a preempted sequence,
        which has waited its turn already) ahead of those that rank alike."""
        rank = self._rank(seq)
        if again:
            at = next((i for i, other in enumerate(self.waiting) if self._rank(other) >= rank), len(self.waiting))
        else:
            at = self._behind(self.waiting, rank)
        self.waiting.insert(at, seq)

    def _run(self, seq: Sequence) -> None:
        """Into the running list behind those that rank before it or alike: the last one is preempted first."""
        self.running.insert(self._behind(self.running, self._rank(seq)), seq)

    def _behind(self, queue: deque[Sequence] | list[Sequence], rank: int) -> int:
        """Just behind the last sequence of a queue kept in rank order that ranks before `rank` or alike. The scan
        starts at the back, so in arrival order (fcfs, or a rank no one exceeds) it ends at once."""
        for i in range(len(queue) - 1, -1, -1):
            if self._rank(queue[i]) <= rank:
                return i + 1
        return 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens still to compute: the rest of every prompt being prefilled, and every waiting prompt less
        the prefix the cache would supply when it is admitted. This is the backlog routers and the autoscaler
        weigh: counting cached prefixes too would make a replica that holds a busy prefix look the busiest, and
        push that prefix's requests away from the only replica that has it."""
        waiting = sum(s.num_new_tokens - (0 if s.num_computed_tokens else self._num_cached_blocks(s) *
                                          self.block_manager.block_size) for s in self.waiting)
        return waiting + sum(s.num_new_tokens for s in self.running if s.num_new_tokens > 1)

    def _num_cached_blocks(self, seq: Sequence) -> int:
        """The blocks of the sequence's prefix the cache would supply, on the device or reloaded from the host."""
        num_computed = len(self.block_manager.get_computed_blocks(seq))
        return num_computed + len(self.block_manager.get_offloaded_blocks(seq, num_computed))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_new_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
            out.scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        return self._schedule_guesses(out, budget)

    def _schedule_guesses(self, out: SchedulerOutput, budget: int) -> int:
        """Adds each scheduled decode's guesses at its next tokens (speculative.py) as far as the budget and the
        free blocks go, once every running sequence has its own token: guesses never cost another its place."""
        for index, (seq, num_new) in enumerate(out.scheduled):
            guesses = seq.draft_token_ids
            del guesses[max(0, budget):]
            if guesses and self.block_manager.allocate_slots(seq, num_new + len(guesses)):
                out.scheduled[index] = (seq, num_new + len(guesses))
                budget -= len(guesses)
            else:
                guesses.clear()
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admits waiting sequences in order while blocks, budget and seats last. A sequence whose next uncached
        block a running prefill is computing right now waits for it (those behind it go ahead): admitted at once
        it would compute the same blocks a second time, as a burst of requests on a new system prompt would,
        each missing the cache the first is filling."""
        in_progress = self._blocks_in_progress()
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            computed = self.block_manager.get_computed_blocks(seq)
            reloaded = self.block_manager.get_offloaded_blocks(seq, len(computed))
            if self._awaits(seq, len(computed) + len(reloaded), in_progress):
                continue
            num_computed = (len(computed) + len(reloaded)) * self.block_manager.block_size
            num_new = seq.num_tokens - num_computed
            if num_new > budget:
                # Without chunking a prompt runs whole; an oversized one runs alone in a step of its own.
                if self.config.enable_chunked_prefill:
                    num_new = budget
                elif out.scheduled:
                    return
            if not self.block_manager.allocate_slots(seq, num_new, computed, reloaded):
                return
            self.waiting.remove(seq)
            seq.num_computed_tokens = num_computed
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            self._run(seq)
            out.scheduled.append((seq, num_new))
            budget -= num_new
            in_progress |= self._blocks_in_progress([seq])  # a twin behind it in the queue waits for it too

    def _blocks_in_progress(self, seqs: list[Sequence] | None = None) -> set:
        """Hashes of the full blocks the running prefills (or `seqs`) have yet to finish computing."""
        if not self.block_manager.enable_prefix_caching:
            return set()
        size = self.block_manager.block_size
        return {h for seq in (self.running if seqs is None else seqs) if seq.num_new_tokens > 1
                for h in seq.block_hashes[seq.num_computed_tokens // size:]}

    def _awaits(self, seq: Sequence, num_cached_blocks: int, in_progress: set) -> bool:
        """Whether the next block the sequence could take from the cache is one a running prefill is computing."""
        usable = self.block_manager.cacheable_hashes(seq)
        return num_cached_blocks < len(usable) and usable[num_cached_blocks] in in_progress

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self._wait(seq, again=True)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose blocks are allocated and whose KV is already computed (it came from a prefill
        group), so it decodes from the next step on."""
        seq.status = SequenceStatus.RUNNING
        self._run(seq)

    def finish(self, seq: Sequence, reason: FinishReason, free_blocks: bool = True) -> None:
        """End a sequence wherever it is (waiting or running); its blocks are freed unless the caller keeps them
        pinned (a prefill group holding KV for a decode group)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:  # a sequence still receiving its KV is waiting but not queued
            self.waiting.remove(seq)
        if free_blocks:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
