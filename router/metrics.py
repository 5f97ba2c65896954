"""The ingress's Prometheus metrics, served at GET /metrics (router/openai_api.py).

Two kinds. Request metrics, counted by each ingress replica for the requests it served (gRPC and HTTP alike,
since Ingress.generate reports them): latency histograms, token and outcome counters, the requests in flight,
and per LoRA adapter the requests and tokens generated (who used which adapter, and how much). With Redis, a
scrape shows the sum over every ingress replica (router/replica_metrics.py), whichever replica answers it.
Group metrics, one sample per live worker group (labels pool = its role, group = its id): read from the load
reports the groups write to Redis every second (router/load_view.py), once per scrape, so a group that died
simply disappears instead of leaving a stale sample behind.

Latencies, in seconds:
- time to first token: the ingress receiving the request to its first output (TimeToFirstToken.total_s);
- inter-token latency: between consecutive outputs that carried new tokens;
- end to end: time to first token plus first to last token output; observed for requests that finished ("ok"),
  so a client that gave up does not count as a slow request;
- KV transfer: the time the decode group spent pulling a prompt's KV from the prefill group (disaggregated
  requests only).
"""

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sized

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from router.load_view import LoadView
from router.replica_metrics import ReplicaMetrics, Samples
from workers.engine.outputs import TimeToFirstToken, Usage

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
OUTCOMES = ("ok", "invalid_argument", "not_found", "unauthenticated", "resource_exhausted", "unavailable",
            "deadline_exceeded", "cancelled", "internal")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class IngressMetrics:
    def __init__(self, load_view: LoadView | None = None, index: Sized | None = None, adapters: tuple[str, ...] = (),
                 replicas: ReplicaMetrics | None = None):
        """With a load view the per-group gauges come from the groups' Redis reports; without one (no Redis)
        only the request metrics are shown. With the replica's KV-block index, its size is shown too: it must
        stay bounded on a long run. `adapters`: the LoRA adapters served, each with its own series. With
        `replicas` the request metrics are summed over every ingress replica."""
        self.load_view = load_view
        self.replicas = replicas
        self._own = CollectorRegistry()  # this replica's own request metrics
        self._summed = _SummedRequests(self._own)
        self._groups = _GroupCollector()
        self._scraped = CollectorRegistry()  # what a scrape shows
        self._scraped.register(self._summed)
        self._scraped.register(self._groups)
        r = self._own
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Request received to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Between consecutive token outputs",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "Request received to its last token, or to its "
                             "vector for an embedding (finished requests)", buckets=_E2E_BUCKETS, registry=r)
        self.kv_transfer = Histogram("tandem_kv_transfer_seconds", "Pulling a prompt's KV from the prefill group",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("tandem_requests", "Requests by outcome (a lowercase gRPC status)", ["outcome"],
                                registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.cached_tokens = Counter("tandem_cached_prompt_tokens", "Prompt tokens the prefix cache supplied",
                                     registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens generated", registry=r)
        self.kv_transfer_bytes = Counter("tandem_kv_transfer_bytes", "KV bytes moved from prefill to decode groups",
                                         registry=r)
        self.migrations = Counter("tandem_request_migrations", "Times a request moved to another decode group after "
                                  "the one streaming it was lost", registry=r)
        self.running = Gauge("tandem_requests_running", "Requests this ingress replica is serving now", registry=r)
        self.lora_requests = Counter("tandem_lora_requests", "Requests that named a LoRA adapter, by adapter",
                                     ["adapter"], registry=r)
        self.lora_generation_tokens = Counter("tandem_lora_generation_tokens", "Tokens generated by a LoRA adapter, "
                                              "by adapter", ["adapter"], registry=r)
        for adapter in adapters:
            self.lora_requests.labels(adapter=adapter)
            self.lora_generation_tokens.labels(adapter=adapter)
        if index is not None:
            Gauge("tandem_router_index_blocks", "Block hashes in the KV-block index of the ingress replica that "
                  "answered", registry=self._scraped).set_function(lambda: len(index))
        for outcome in OUTCOMES:  # every series exists from the start, so rate() sees the first of each
            self.requests.labels(outcome=outcome)

    def request_started(self) -> None:
        self.running.inc()

    def request_refused(self, outcome: str) -> None:
        """A request refused before it started (bad input, auth, a full replica) still counts as requested."""
        self.request_started()
        self.request_finished(outcome, None, [], None)

    def request_finished(self, outcome: str, ttft: TimeToFirstToken | None, token_times: list[float],
                         usage: Usage | None, adapter: str | None = None) -> None:
        """Called once per started request; token_times are the monotonic times of its outputs with new tokens;
        `adapter`: the LoRA adapter it named."""
        self.running.dec()
        self.requests.labels(outcome=outcome).inc()
        if adapter is not None:
            self.lora_requests.labels(adapter=adapter).inc()
            if usage is not None:
                self.lora_generation_tokens.labels(adapter=adapter).inc(usage.generated_tokens)
        for earlier, later in zip(token_times, token_times[1:]):
            self.itl.observe(later - earlier)
        if ttft is not None:
            self.ttft.observe(ttft.total_s)
            if ttft.kv_transfer_bytes:
                self.kv_transfer.observe(ttft.kv_transfer_s)
                self.kv_transfer_bytes.inc(ttft.kv_transfer_bytes)
            if outcome == "ok":
                self.e2e.observe(ttft.total_s + (token_times[-1] - token_times[0] if token_times else 0.0))
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.cached_tokens.inc(usage.cached_tokens)
            self.generation_tokens.inc(usage.generated_tokens)

    def samples(self) -> Samples:
        """This replica's request metrics, for the other replicas' scrapes (creation times left out)."""
        return _samples(self._own.collect())

    def counts(self) -> Samples:
        """Of those, the cumulative ones (counters and histograms): what a stopping replica leaves in the sum."""
        return _samples(family for family in self._own.collect() if family.type != "gauge")

    async def render(self) -> bytes:
        """The Prometheus text exposition, with the groups' reports and the other replicas' samples read now."""
        reports = {}
        if self.load_view is not None:
            try:
                reports = await self.load_view.reports()
            except Exception as e:  # Redis away: the request metrics still get scraped
                logger.warning("metrics: no group load reports (%s: %s)", type(e).__name__, e)
        others = await self.replicas.others() if self.replicas is not None else []
        # No await between these and the rendering: one scrape, one snapshot.
        self._groups.reports, self._summed.others = reports, others
        return generate_latest(self._scraped)


# (name, help, kind, value of a report); kind "gauge" or "counter" (cumulative since the group started).
_GROUP_METRICS = (
    ("tandem_group_running_seqs", "Sequences the group is running", "gauge", lambda r: r["running_seqs"]),
    ("tandem_group_waiting_seqs", "Sequences waiting in the group's scheduler", "gauge", lambda r: r["waiting_seqs"]),
    ("tandem_group_pinned_seqs", "Prefilled requests whose KV waits for a decode group to pull it", "gauge",
     lambda r: r["pinned_seqs"]),
    ("tandem_group_queued_prefill_tokens", "Prompt tokens queued for prefill", "gauge",
     lambda r: r["queued_prefill_tokens"]),
    ("tandem_group_kv_cache_usage_ratio", "Share of the group's KV blocks in use (1 - free/total)", "gauge",
     lambda r: 1.0 - r["free_blocks"] / r["total_blocks"] if r["total_blocks"] else 0.0),
    ("tandem_group_kv_host_usage_ratio", "Share of the group's host tier (kv_offload_gb) holding evicted blocks",
     "gauge", lambda r: r["host_blocks_used"] / r["host_blocks"] if r["host_blocks"] else 0.0),
    ("tandem_group_kv_offloaded_blocks", "Cached KV blocks saved to the host tier as the KV cache evicted them",
     "counter", lambda r: r["offloaded_blocks"]),
    ("tandem_group_kv_reloaded_blocks", "Of the prompts' cached blocks, those copied back from the host tier",
     "counter", lambda r: r["reloaded_blocks"]),
    ("tandem_group_prefix_cache_hit_rate", "Prompt tokens the prefix cache supplied / prompt tokens, since the "
     "group started", "gauge", lambda r: r["cached_prompt_tokens"] / r["prompt_tokens"] if r["prompt_tokens"] else 0.0),
    ("tandem_group_finished_requests", "Requests the group finished", "counter", lambda r: r["finished"]),
    ("tandem_group_prompt_tokens", "Prompt tokens of the group's finished requests", "counter",
     lambda r: r["prompt_tokens"]),
    ("tandem_group_cached_prompt_tokens", "Of those, tokens the prefix cache supplied", "counter",
     lambda r: r["cached_prompt_tokens"]),
    ("tandem_group_computed_prompt_tokens", "Prompt tokens the group computed (cache hits not)", "counter",
     lambda r: r["computed_prompt_tokens"]),
    ("tandem_group_generated_tokens", "Tokens the group generated", "counter", lambda r: r["generated_tokens"]),
    ("tandem_group_kv_sent_bytes", "KV bytes the group sent to other groups", "counter", lambda r: r["kv_bytes_sent"]),
    ("tandem_group_kv_received_bytes", "KV bytes the group received from other groups", "counter",
     lambda r: r["kv_bytes_received"]),
    ("tandem_group_kv_transfer_failures", "KV transfers that failed (the request was recomputed)", "counter",
     lambda r: r["kv_transfer_failures"]),
    ("tandem_group_spec_guessed_tokens", "Tokens speculative decoding guessed and computed", "counter",
     lambda r: r["guessed_tokens"]),
    ("tandem_group_spec_accepted_tokens", "Of those, the ones the model agreed with (kept)", "counter",
     lambda r: r["accepted_guesses"]),
    ("tandem_group_lora_adapters", "LoRA adapters the group holds now (started with, and loaded on demand)", "gauge",
     lambda r: r["lora_adapters"]),
    ("tandem_group_lora_loads", "LoRA adapters the group loaded as requests named them", "counter",
     lambda r: r["lora_loads"]),
    ("tandem_group_lora_drops", "Of those, the ones dropped again for room (max_loras)", "counter",
     lambda r: r["lora_drops"]),
)


def _samples(families: Iterable[Metric]) -> Samples:
    return [(family.name, s.name, s.labels, s.value) for family in families
            for s in family.samples if not s.name.endswith("_created")]


class _SummedRequests(Collector):
    """This replica's request metrics, each sample plus the same sample of the other replicas (a counter or
    bucket another replica has and this one has not, e.g. an adapter only it served, is shown too)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.others: list[Samples] = []

    def collect(self) -> Iterator[Metric]:
        extra: dict[str, dict[tuple[str, tuple], float]] = defaultdict(lambda: defaultdict(float))
        for samples in self.others:
            for family, name, labels, value in samples:
                extra[family][(name, tuple(sorted(labels.items())))] += value
        for family in self.registry.collect():
            summed = Metric(family.name, family.documentation, family.type, family.unit)
            theirs = extra.get(family.name, {})
            for s in family.samples:
                value = s.value + theirs.pop((s.name, tuple(sorted(s.labels.items()))), 0.0)
                summed.add_sample(s.name, s.labels, value, s.timestamp, s.exemplar)
            for (name, labels), value in theirs.items():
                summed.add_sample(name, dict(labels), value)
            yield summed


class _GroupCollector(Collector):
    """Per-group samples from the snapshot of reports render() read for this scrape."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    def collect(self) -> Iterator[Metric]:
        for name, doc, kind, value in _GROUP_METRICS:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc,
                                                                                    labels=["pool", "group"])
            for group, report in self.reports.items():
                try:
                    family.add_metric([str(report.get("role", "")), group], float(value(report)))
                except (KeyError, TypeError, ValueError):
                    continue  # a report from a worker that does not count this (an older version)
            yield family
