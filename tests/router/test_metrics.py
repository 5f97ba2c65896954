"""IngressMetrics: what the ingress reports per request shows up in the Prometheus text as the right samples, and
each live worker group's Redis load report becomes one set of per-group samples, read fresh on every scrape; the
chart's Grafana dashboard asks for those series."""

import asyncio
import json
import pickle
import re
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.ingress import GenerateRequest, Ingress, ServedModel
from router.kv_index import KVIndex
from router.load_view import LoadView
from router.metrics import CONTENT_TYPE, IngressMetrics
from router.replica_metrics import ReplicaMetrics
from tests.helm.test_chart import VALUE_SETS, one
from tests.helm.test_chart import objects as chart_objects
from workers.engine.errors import InvalidRequestError
from workers.engine.outputs import TimeToFirstToken, Usage
from workers.kv_events import KVKeys


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def render(metrics: IngressMetrics) -> dict[tuple[str, tuple], float]:
    return samples(asyncio.run(metrics.render()))


def ttft(total_s: float, kv_transfer_s: float = 0.0, kv_transfer_bytes: int = 0) -> TimeToFirstToken:
    return TimeToFirstToken(total_s=total_s, router_queue_s=0.01, prefill_queue_s=0.0, prefill_compute_s=0.1,
                            kv_transfer_s=kv_transfer_s, kv_transfer_bytes=kv_transfer_bytes)


def test_a_finished_request_is_counted_in_every_request_metric():
    metrics = IngressMetrics()
    metrics.request_started()
    metrics.request_started()
    assert render(metrics)[("tandem_requests_running", ())] == 2
    metrics.request_finished("ok", ttft(0.25, kv_transfer_s=0.05, kv_transfer_bytes=4096), [10.0, 10.5, 11.25],
                             Usage(prompt_tokens=40, cached_tokens=32, generated_tokens=3))
    got = render(metrics)
    assert got[("tandem_requests_running", ())] == 1
    assert got[("tandem_requests_total", (("outcome", "ok"),))] == 1
    assert got[("tandem_requests_total", (("outcome", "cancelled"),))] == 0  # every outcome exists from the start
    assert got[("tandem_time_to_first_token_seconds_count", ())] == 1
    assert got[("tandem_time_to_first_token_seconds_sum", ())] == 0.25
    assert got[("tandem_time_to_first_token_seconds_bucket", (("le", "0.3"),))] == 1
    assert got[("tandem_time_to_first_token_seconds_bucket", (("le", "0.2"),))] == 0
    assert got[("tandem_inter_token_latency_seconds_count", ())] == 2  # three token outputs, two gaps
    assert got[("tandem_inter_token_latency_seconds_sum", ())] == 1.25
    assert got[("tandem_e2e_request_latency_seconds_sum", ())] == 0.25 + 1.25  # first token, then to the last
    assert got[("tandem_kv_transfer_seconds_count", ())] == 1
    assert got[("tandem_kv_transfer_seconds_sum", ())] == 0.05
    assert got[("tandem_kv_transfer_bytes_total", ())] == 4096
    assert got[("tandem_prompt_tokens_total", ())] == 40
    assert got[("tandem_cached_prompt_tokens_total", ())] == 32
    assert got[("tandem_generation_tokens_total", ())] == 3


def test_requests_naming_a_lora_adapter_are_counted_per_adapter_from_the_start():
    metrics = IngressMetrics(adapters=("sql", "chat"))
    assert render(metrics)[("tandem_lora_requests_total", (("adapter", "chat"),))] == 0
    for adapter, generated in (("sql", 5), ("sql", 7), (None, 11)):
        metrics.request_started()
        metrics.request_finished("ok", ttft(0.1), [1.0], Usage(prompt_tokens=9, cached_tokens=0,
                                                                generated_tokens=generated), adapter)
    got = render(metrics)
    assert got[("tandem_lora_requests_total", (("adapter", "sql"),))] == 2
    assert got[("tandem_lora_generation_tokens_total", (("adapter", "sql"),))] == 12
    assert got[("tandem_lora_requests_total", (("adapter", "chat"),))] == 0
    assert got[("tandem_generation_tokens_total", ())] == 23  # the base model's requests and the adapters' alike


def test_a_failed_request_counts_its_outcome_but_no_latency():
    metrics = IngressMetrics()
    metrics.request_started()
    metrics.request_finished("invalid_argument", None, [], None)
    metrics.request_started()
    metrics.request_finished("cancelled", ttft(0.1), [5.0, 5.2], Usage(10, 0, 2))  # left after two tokens
    got = render(metrics)
    assert got[("tandem_requests_total", (("outcome", "invalid_argument"),))] == 1
    assert got[("tandem_requests_total", (("outcome", "cancelled"),))] == 1
    assert got[("tandem_requests_running", ())] == 0
    assert got[("tandem_time_to_first_token_seconds_count", ())] == 1  # its first token did come
    assert got[("tandem_e2e_request_latency_seconds_count", ())] == 0  # only finished requests
    assert got[("tandem_kv_transfer_seconds_count", ())] == 0  # unified: no KV moved
    assert got[("tandem_generation_tokens_total", ())] == 2


def test_each_instance_has_its_own_registry():
    first, second = IngressMetrics(), IngressMetrics()
    first.request_started()
    assert render(second)[("tandem_requests_running", ())] == 0


def test_a_scrape_counts_every_ingress_replicas_requests_whichever_replica_answers(redis_url):
    """Serve's proxy sends each scrape to one replica: both answer with the sum. A replica that stops leaves its
    counts in it (retired), so the sum never drops, as does every replica that starts after; its requests running
    leave with it."""
    namespace = f"test-replicas-{uuid.uuid4().hex}"

    async def scrape():
        a = IngressMetrics(adapters=("sql",), replicas=ReplicaMetrics(redis_url, namespace, period_s=0.05))
        b = IngressMetrics(replicas=ReplicaMetrics(redis_url, namespace, period_s=0.05))
        a.request_started()
        a.request_finished("ok", ttft(0.25), [1.0, 1.5], Usage(prompt_tokens=40, cached_tokens=32,
                                                              generated_tokens=3), adapter="sql")
        b.request_started()
        b.request_finished("ok", ttft(0.05), [2.0, 2.1], Usage(prompt_tokens=10, cached_tokens=0, generated_tokens=2))
        b.request_started()  # still running
        for metrics in (a, b):
            metrics.replicas.start(metrics.samples)
        await asyncio.sleep(0.3)
        both = [samples(await metrics.render()) for metrics in (a, b)]
        a.request_started()  # running as it stops
        await a.replicas.stop(a.counts())
        after = samples(await b.render())
        c = IngressMetrics(replicas=ReplicaMetrics(redis_url, namespace, period_s=0.05))
        newcomer = samples(await c.render())
        await b.replicas.stop(b.counts())
        return both, after, newcomer

    both, after, newcomer = asyncio.run(scrape())
    for got in both:
        assert got[("tandem_requests_total", (("outcome", "ok"),))] == 2
        assert got[("tandem_requests_running", ())] == 1
        assert (got[("tandem_prompt_tokens_total", ())], got[("tandem_generation_tokens_total", ())]) == (50, 5)
        assert got[("tandem_time_to_first_token_seconds_count", ())] == 2
        assert got[("tandem_time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 1
        assert got[("tandem_lora_requests_total", (("adapter", "sql"),))] == 1  # only `a` serves that adapter
    for got in (after, newcomer):
        assert got[("tandem_requests_total", (("outcome", "ok"),))] == 2
        assert got[("tandem_time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 1
        assert got[("tandem_lora_requests_total", (("adapter", "sql"),))] == 1
    assert after[("tandem_requests_running", ())] == 1  # b's own; a's left with it
    assert newcomer[("tandem_requests_running", ())] == 1  # b's, from its samples


@pytest.mark.filterwarnings("ignore:coroutine .Ingress.__del__. was never awaited")
def test_ingress_replicas_share_their_counts_while_they_serve(redis_url, tiny_model_factory):
    """The wiring: a replica writes its samples once Serve builds its HTTP app, and retires them as it stops.
    Two ingresses without pools (every request here is refused before it would reach one)."""
    model = ServedModel("tiny", str(tiny_model_factory("llama")), max_model_len=1024, vocab_size=49152, block_size=16,
                    hidden_size=64)

    async def refuse(ingress: Ingress) -> None:
        with pytest.raises(InvalidRequestError):
            async for _ in ingress.generate(GenerateRequest(prompt="")):
                pass

    async def run():
        a, b = (Ingress(None, None, model, redis_url=redis_url) for _ in range(2))
        for ingress in (a, b):
            await ingress.__serve_build_asgi_app__()
        # The counts of replicas that stopped before (other tests' clusters on this Redis) are in the sum too.
        before = samples(await a.metrics.render())
        await refuse(a)
        await refuse(a)
        await refuse(b)
        await asyncio.sleep(2.5)  # a write period
        both = [samples(await ingress.metrics.render()) for ingress in (a, b)]
        await a.__del__()
        after = samples(await b.metrics.render())
        await b.__del__()
        return before, both, after

    before, both, after = asyncio.run(run())
    refused = ("tandem_requests_total", (("outcome", "invalid_argument"),))
    assert [got[refused] - before[refused] for got in both] == [3, 3]
    assert after[refused] - before[refused] == 3


def test_another_replicas_samples_and_retired_counts_that_are_not_samples_are_left_out(redis_url):
    import redis

    namespace = f"test-replicas-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url)
    client.sadd(f"{{{namespace}}}:ingress-replicas", "x", "y", b"\xff")
    client.set(f"{{{namespace}}}:ingress-metrics:x", pickle.dumps({"not": "json"}))
    client.set(f"{{{namespace}}}:ingress-metrics:y", json.dumps([["tandem_requests", "tandem_requests_total"]]))
    retired = json.dumps(["tandem_requests", "tandem_requests_total", {"outcome": "ok"}], sort_keys=True)
    client.hset(f"{{{namespace}}}:ingress-retired", mapping={"not json": 5, '["too", "short"]': 5, retired: 2})
    metrics = IngressMetrics(replicas=ReplicaMetrics(redis_url, namespace))
    metrics.request_started()
    metrics.request_finished("ok", ttft(0.1), [1.0], Usage(prompt_tokens=1, cached_tokens=0, generated_tokens=1))
    assert render(metrics)[("tandem_requests_total", (("outcome", "ok"),))] == 1 + 2


def report(role: str, **overrides) -> dict:
    load = dict(role=role, running_seqs=3, queued_prefill_tokens=120, free_blocks=48, total_blocks=64,
                waiting_seqs=2, pinned_seqs=4, finished=10, prompt_tokens=400, cached_prompt_tokens=100,
                kv_bytes_sent=0, kv_bytes_received=0, kv_transfer_failures=0, guessed_tokens=0, accepted_guesses=0,
                computed_prompt_tokens=300, generated_tokens=0, lora_adapters=0, lora_loads=0, lora_drops=0,
                host_blocks=0, host_blocks_used=0, offloaded_blocks=0, reloaded_blocks=0)
    return {**load, **overrides}


def test_every_live_groups_load_report_becomes_per_group_samples(redis_url):
    import redis

    keys = KVKeys(f"test-metrics-{uuid.uuid4().hex}")
    client = redis.Redis.from_url(redis_url)
    client.sadd(keys.groups, "p1", "d1", "gone")  # "gone": its report expired with its heartbeat
    client.set(keys.load("p1"), json.dumps(report("prefill", kv_bytes_sent=8192)))
    client.set(keys.load("d1"), json.dumps(report("decode", free_blocks=16, kv_bytes_received=8192,
                                                  kv_transfer_failures=1, guessed_tokens=40, accepted_guesses=28,
                                                  computed_prompt_tokens=0, generated_tokens=900, lora_adapters=3,
                                                  lora_loads=5, lora_drops=2, host_blocks=200, host_blocks_used=50,
                                                  offloaded_blocks=70, reloaded_blocks=30)))

    async def scrape():
        view = LoadView(redis_url, namespace=keys.namespace)
        try:
            metrics = IngressMetrics(view)
            first = samples(await metrics.render())
            client.set(keys.load("d1"), json.dumps(report("decode", running_seqs=7)))
            return first, samples(await metrics.render())
        finally:
            await view.close()

    got, later = asyncio.run(scrape())
    p1, d1 = (("group", "p1"), ("pool", "prefill")), (("group", "d1"), ("pool", "decode"))
    assert got[("tandem_group_queued_prefill_tokens", p1)] == 120
    assert got[("tandem_group_running_seqs", p1)] == 3
    assert got[("tandem_group_waiting_seqs", p1)] == 2
    assert got[("tandem_group_pinned_seqs", p1)] == 4
    assert got[("tandem_group_kv_cache_usage_ratio", p1)] == 0.25
    assert got[("tandem_group_kv_cache_usage_ratio", d1)] == 0.75
    assert got[("tandem_group_prefix_cache_hit_rate", p1)] == 0.25
    assert got[("tandem_group_kv_sent_bytes_total", p1)] == 8192
    assert got[("tandem_group_computed_prompt_tokens_total", p1)] == 300
    assert got[("tandem_group_generated_tokens_total", d1)] == 900
    assert got[("tandem_group_kv_received_bytes_total", d1)] == 8192
    assert got[("tandem_group_kv_transfer_failures_total", d1)] == 1
    assert (got[("tandem_group_spec_guessed_tokens_total", d1)], got[("tandem_group_spec_accepted_tokens_total", d1)]) \
        == (40, 28)
    assert [got[(f"tandem_group_lora_{name}", d1)] for name in ("adapters", "loads_total", "drops_total")] == [3, 5, 2]
    assert [got[(f"tandem_group_kv_{name}", d1)] for name in ("host_usage_ratio", "offloaded_blocks_total",
                                                              "reloaded_blocks_total")] == [0.25, 70, 30]
    assert got[("tandem_group_kv_host_usage_ratio", p1)] == 0  # no host tier
    assert not any(dict(labels).get("group") == "gone" for _, labels in got)
    assert later[("tandem_group_running_seqs", d1)] == 7  # read again for the next scrape


def test_the_kv_index_size_is_read_at_each_scrape():
    index = KVIndex()
    metrics = IngressMetrics(index=index)
    assert render(metrics)[("tandem_router_index_blocks", ())] == 0
    index.add("group-a", [b"h1", b"h2"])
    index.add("group-b", [b"h2"])
    assert render(metrics)[("tandem_router_index_blocks", ())] == 2
    index.drop_group("group-a")
    assert render(metrics)[("tandem_router_index_blocks", ())] == 1


def test_without_redis_the_request_metrics_are_still_served():
    metrics = IngressMetrics(LoadView("redis://127.0.0.1:1"))  # nothing listens there
    text = asyncio.run(metrics.render())
    assert b"tandem_requests_running 0.0" in text
    assert CONTENT_TYPE.startswith("text/plain")


@pytest.mark.parametrize("missing, metric", [("waiting_seqs", "tandem_group_waiting_seqs"),
                                             ("kv_bytes_sent", "tandem_group_kv_sent_bytes_total")])
def test_a_report_without_a_newer_key_just_lacks_that_sample(redis_url, missing, metric):
    import redis

    keys = KVKeys(f"test-metrics-{uuid.uuid4().hex}")
    client = redis.Redis.from_url(redis_url)
    load = report("decode")
    del load[missing]
    client.sadd(keys.groups, "d1")
    client.set(keys.load("d1"), json.dumps(load))

    async def scrape():
        view = LoadView(redis_url, namespace=keys.namespace)
        try:
            return samples(await IngressMetrics(view).render())
        finally:
            await view.close()

    names = {name for name, _ in asyncio.run(scrape())}
    assert "tandem_group_running_seqs" in names
    assert metric not in names


DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "tandem" / "dashboards" / "tandem.json"


@pytest.fixture(scope="module")
def exported(redis_url) -> dict[str, set[str]]:
    """Every series /metrics serves (a request counted, an adapter, two groups reporting), and its label names."""
    import redis

    keys = KVKeys(f"test-exported-{uuid.uuid4().hex}")
    client = redis.Redis.from_url(redis_url)
    client.sadd(keys.groups, "p1", "d1")
    client.set(keys.load("p1"), json.dumps(report("prefill")))
    client.set(keys.load("d1"), json.dumps(report("decode")))

    async def scrape() -> bytes:
        view = LoadView(redis_url, namespace=keys.namespace)
        try:
            metrics = IngressMetrics(view, KVIndex(), adapters=("sql",))
            metrics.request_started()
            metrics.request_finished("ok", ttft(0.2, 0.01, 1024), [1.0, 1.1], Usage(8, 0, 2), adapter="sql")
            return await metrics.render()
        finally:
            await view.close()

    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(asyncio.run(scrape()).decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def assert_queries_what_is_exported(expr: str, legend: str, exported: dict[str, set[str]], where: str) -> None:
    """Every series `expr` names is one /metrics serves (a renamed metric would leave it empty), and every label
    it groups by or `legend` shows is one that series carries."""
    names = re.findall(r"\btandem_\w+", expr)
    assert names and set(names) <= set(exported), (where, expr)
    carried = set.union(*(exported[name] for name in names))
    grouped = {label.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for label in by.split(",")}
    assert grouped | set(re.findall(r"\{\{(\w+)\}\}", legend)) <= carried, (where, expr)


def test_the_grafana_dashboard_queries_only_series_and_labels_the_metrics_have(exported):
    """Each series is the chosen release's (the dashboard's namespace and job variables), so releases do not mix."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace", "job"]
    every = dashboard["panels"]
    assert len({p["id"] for p in every}) == len(every)
    for panel in [p for p in every if p["type"] != "row"]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert_queries_what_is_exported(expr, target["legendFormat"], exported, panel["title"])
            assert expr.count("tandem_") == expr.count('{namespace=~"$namespace", job=~"$job"}'), expr


def test_the_charts_alerts_query_only_series_and_labels_the_metrics_have(exported):
    rules = one(chart_objects(VALUE_SETS["monitoring"]), "PrometheusRule")["spec"]["groups"][0]["rules"]
    for rule in rules:
        if rule["alert"] != "TandemDown":  # Prometheus's own `up`
            assert_queries_what_is_exported(rule["expr"], "", exported, rule["alert"])
