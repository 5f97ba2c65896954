"""The cluster's throughput and load on `tandem serve`'s console while it works, as vLLM's engine logs its own:

    tandem: decode pool, 1 group: generation 45.7 tok/s, running 7, waiting 0, KV cache 3.8% used

and for a prefill pool the prompt tokens it computed a second, the share its prefix cache supplied, and the
requests whose KV awaits a decode group (a queue that grows when decode falls behind); with kv_offload_gb, how full
the host tier is.

Read from the load reports each worker group writes to Redis every second (workers/kv_events.py), so the lines
cover every replica of every pool, wherever it runs. Rates are the change in each group's running totals since
the previous line; nothing is printed while the cluster is idle.
"""

import asyncio
from dataclasses import dataclass

from router.load_view import LoadView

# Running totals a group reports (EngineStats), whose change over an interval is a rate.
_COUNTERS = ("prompt_tokens", "cached_prompt_tokens", "computed_prompt_tokens", "generated_tokens")


@dataclass
class PoolLine:
    role: str
    groups: int
    computed_prompt_tokens_per_s: float
    generated_tokens_per_s: float
    cached_pct: float | None  # of the prompt tokens of requests that finished in the interval
    running: int
    waiting: int
    pinned: int  # prefilled requests whose KV waits for a decode group: a queue that grows when decode lags
    kv_used_pct: float
    host_used_pct: float | None = None  # the groups' host tiers (kv_offload_gb); None without one

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.pinned or self.computed_prompt_tokens_per_s or
                    self.generated_tokens_per_s)

    def __str__(self) -> str:
        """A prefill pool's generation is one token per prompt, and a decode pool computes prompts only when it
        runs unified or recomputes a prompt whose KV did not arrive: each says what it does."""
        parts = []
        if self.role == "prefill" or self.computed_prompt_tokens_per_s:
            cached = "" if self.cached_pct is None else f" ({self.cached_pct:.0f}% cached)"
            parts.append(f"prompt {self.computed_prompt_tokens_per_s:.1f} tok/s computed{cached}")
        if self.role != "prefill":
            parts.append(f"generation {self.generated_tokens_per_s:.1f} tok/s")
        parts += [f"running {self.running}", f"waiting {self.waiting}"]
        if self.role == "prefill":
            parts.append(f"awaiting decode {self.pinned}")
        plural = "" if self.groups == 1 else "s"
        host = "" if self.host_used_pct is None else f", host tier {self.host_used_pct:.1f}% used"
        return (f"{self.role} pool, {self.groups} group{plural}: {', '.join(parts)}, KV cache {self.kv_used_pct:.1f}% "
                f"used{host}")


def pool_lines(before: dict[str, dict], now: dict[str, dict], elapsed_s: float) -> list[PoolLine]:
    """A line per pool from two snapshots of the groups' reports (group id -> report). A group new since `before`
    counts from zero; one whose totals went down restarted, and counts from zero too."""
    pools: dict[str, list[tuple[dict, dict]]] = {}
    for group, report in now.items():
        pools.setdefault(report.get("role", "?"), []).append((before.get(group, {}), report))
    lines = []
    for role in sorted(pools):
        pairs = pools[role]
        delta = {name: sum(_increase(old.get(name, 0), new.get(name, 0)) for old, new in pairs) for name in _COUNTERS}
        total_blocks = sum(new.get("total_blocks", 0) for _, new in pairs)
        free_blocks = sum(new.get("free_blocks", 0) for _, new in pairs)
        host_blocks = sum(new.get("host_blocks", 0) for _, new in pairs)
        lines.append(PoolLine(
            role=role, groups=len(pairs),
            computed_prompt_tokens_per_s=delta["computed_prompt_tokens"] / elapsed_s,
            generated_tokens_per_s=delta["generated_tokens"] / elapsed_s,
            cached_pct=100 * delta["cached_prompt_tokens"] / delta["prompt_tokens"] if delta["prompt_tokens"] else None,
            running=sum(new.get("running_seqs", 0) for _, new in pairs),
            waiting=sum(new.get("waiting_seqs", 0) for _, new in pairs),
            pinned=sum(new.get("pinned_seqs", 0) for _, new in pairs),
            kv_used_pct=100 * (1 - free_blocks / total_blocks) if total_blocks else 0.0,
            host_used_pct=100 * sum(new.get("host_blocks_used", 0) for _, new in pairs) / host_blocks
            if host_blocks else None))
    return lines


class StatsLog:
    """Call `lines()` every interval; it returns what to print, empty while the cluster is idle."""

    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self._before: dict[str, dict] = {}
        self._read_at: float | None = None

    def lines(self, now_s: float) -> list[str]:
        reports = asyncio.run(self._reports())
        previous, self._before = self._before, reports
        elapsed, self._read_at = (None if self._read_at is None else now_s - self._read_at), now_s
        if elapsed is None or elapsed <= 0:
            return []
        pools = pool_lines(previous, reports, elapsed)
        return [str(pool) for pool in pools] if any(pool.busy for pool in pools) else []

    async def _reports(self) -> dict[str, dict]:
        view = LoadView(self.redis_url)  # its connections belong to this call's event loop
        try:
            return await view.reports()
        finally:
            await view.close()


def _increase(old: float, new: float) -> float:
    return new - old if new >= old else new
