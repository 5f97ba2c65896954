"""A worker group's counters as one message: what its rank 0 reports to the pool replica (load signals for the
routers and the autoscaler, Prometheus metrics), kept apart from the engine so the replica need not import it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    num_pinned: int = 0  # prefill role: requests whose blocks wait for a decode group
    num_receiving: int = 0  # decode role: requests whose KV is on its way
    num_kv_channels: int = 0
    kv_bytes_sent: int = 0  # running totals of rank 0's share of the KV this group moved
    kv_bytes_received: int = 0
    num_kv_transfer_failures: int = 0  # decode role: prompts recomputed because their KV did not arrive
    num_queued_prefill_tokens: int = 0  # prompt tokens admitted or waiting still to compute (cached prefixes not)
    num_finished: int = 0  # running totals over finished requests
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # of those prompt tokens, how many the prefix cache supplied
    num_computed_prompt_tokens: int = 0  # running totals over steps: prompt tokens computed, steps, their seconds
    num_steps: int = 0
    step_seconds: float = 0.0
    num_guessed_tokens: int = 0  # speculative decoding's guesses computed, and those the model agreed with
    num_accepted_guesses: int = 0
    num_generated_tokens: int = 0  # running total of tokens sampled and kept
    num_lora_adapters: int = 0  # LoRA adapters loaded now, at start and on demand (adapter_cache.py)
    num_lora_loads: int = 0  # running totals of adapters loaded on demand, and of those dropped again
    num_lora_drops: int = 0
    num_host_blocks: int = 0  # the host tier's size (host_blocks.py), the blocks it holds now, and running totals
    num_host_blocks_used: int = 0  # of blocks saved to it and reloaded from it
    num_offloaded_blocks: int = 0
    num_reloaded_blocks: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_busy_seqs(self) -> int:
        """Every request the group holds work for: running, waiting to run, and (prefill role) pinned until a
        decode group pulls its KV. The load routers weigh: a prefill group bound by KV transfers has nothing
        running and a queue of pinned requests; counted without them it looked idle, and a replica added beside it
        got no work."""
        return self.num_running + self.num_waiting + self.num_pinned
