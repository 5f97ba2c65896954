"""Turns timed runs into the printed table, the target verdicts and the JSON file."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

MIXED = "mixed"
SHARED = "shared-prefix"
TANDEM = "tandem"
HF_SEQUENTIAL = "hf-sequential"
HF_BATCH = "hf-batch"
CACHE_ON = "tandem-cache-on"
CACHE_OFF = "tandem-cache-off"
EVICTED = "evicted-prefix"
HOST_TIER = "tandem-host-tier"
NO_HOST_TIER = "tandem-no-host-tier"


@dataclass
class SystemResult:
    workload: str
    system: str
    requests: int
    output_tokens: int  # generated in total
    wall_s: float
    ttft_s: list[float]
    rss_start_mib: float | None
    rss_peak_mib: float | None
    match_pct: float | None = None  # requests whose greedy tokens all equal the reference system's
    is_reference: bool = False  # the system the others' tokens are compared against
    cached_tokens: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def ttft_p50_s(self) -> float:
        return percentile(self.ttft_s, 50)

    @property
    def ttft_p99_s(self) -> float:
        return percentile(self.ttft_s, 99)

    def as_dict(self) -> dict:
        return dict(workload=self.workload, system=self.system, requests=self.requests,
                    output_tokens=self.output_tokens, wall_s=self.wall_s, output_tokens_per_s=self.tokens_per_s,
                    ttft_p50_s=self.ttft_p50_s, ttft_p99_s=self.ttft_p99_s, rss_start_mib=self.rss_start_mib,
                    rss_peak_mib=self.rss_peak_mib, match_pct=self.match_pct, is_reference=self.is_reference,
                    cached_tokens=self.cached_tokens,
                    ttft_s=self.ttft_s)


@dataclass
class Target:
    name: str
    ratio: float
    goal: float

    @property
    def passed(self) -> bool:
        return self.ratio >= self.goal

    def as_dict(self) -> dict:
        return dict(name=self.name, ratio=self.ratio, goal=self.goal, passed=self.passed)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so p99 of 64 values is not just the max."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def match_pct(outputs: list[list[int]], reference: list[list[int]]) -> float:
    return 100.0 * sum(a == b for a, b in zip(outputs, reference, strict=True)) / len(reference)


def targets(results: list[SystemResult]) -> list[Target]:
    """The ratios the engine is held to; a ratio whose systems did not run (--skip-hf) is left out."""
    by = {(r.workload, r.system): r for r in results}
    found = []
    tandem = by.get((MIXED, TANDEM))
    for system, label, goal in ((HF_SEQUENTIAL, "HF sequential", 4.0), (HF_BATCH, "HF padded batch", 1.5)):
        if tandem and (MIXED, system) in by:
            found.append(Target(f"mixed: Tandem / {label} output tok/s", tandem.tokens_per_s /
                                by[MIXED, system].tokens_per_s, goal))
    on, off = by.get((SHARED, CACHE_ON)), by.get((SHARED, CACHE_OFF))
    if on and off:
        found.append(Target("shared-prefix: TTFT p50 cache off / cache on", off.ttft_p50_s / on.ttft_p50_s, 3.0))
    host, no_host = by.get((EVICTED, HOST_TIER)), by.get((EVICTED, NO_HOST_TIER))
    if host and no_host:
        found.append(Target("evicted-prefix: TTFT p50 no host tier / host tier", no_host.ttft_p50_s / host.ttft_p50_s,
                            2.0))
    return found


def format_report(results: list[SystemResult], verdicts: list[Target]) -> str:
    header = ("workload", "system", "requests", "output tok/s", "TTFT p50 s", "TTFT p99 s", "peak RSS MiB",
              "RSS +MiB", "match %")
    rows = [header] + [(r.workload, r.system, str(r.requests), f"{r.tokens_per_s:.1f}", f"{r.ttft_p50_s:.3f}",
                        f"{r.ttft_p99_s:.3f}", _mib(r.rss_peak_mib), _growth(r), _pct(r))
                       for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if verdicts:
        width = max(len(t.name) for t in verdicts)
        lines.append("")
        lines += [f"{t.name.ljust(width)}  {t.ratio:6.2f}x  (target >= {t.goal:g}x)  {'PASS' if t.passed else 'MISS'}"
                  for t in verdicts]
    return "\n".join(lines)


def write_json(path: Path, config: dict, machine: dict, results: list[SystemResult], verdicts: list[Target]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(config=config, machine=machine, results=[r.as_dict() for r in results],
               targets=[t.as_dict() for t in verdicts])
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _growth(r: SystemResult) -> str:
    if r.rss_peak_mib is None or r.rss_start_mib is None:
        return "-"
    return f"{r.rss_peak_mib - r.rss_start_mib:.0f}"


def _pct(r: SystemResult) -> str:
    if r.is_reference:
        return "ref"
    return "-" if r.match_pct is None else f"{r.match_pct:.0f}"
