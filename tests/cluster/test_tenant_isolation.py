"""Tenant isolation by cache_salt: one tenant's prefix cache is invisible to another, in what the API reports, in
where the router sends a request, and in how long the first token takes.

On one real disaggregated cluster (a prefill and a decode group of a tiny random Llama, gRPC in the ingress):
- the same long prompt under salt A, then B: B is credited 0 cached tokens while A's repeat is credited its
  whole blocks (and B's own repeat is, so salting does not simply turn caching off);
- routing: the block hashes of B's prompt (workers/kv/hashing.py, the ones the ingress computes) match nothing
  in the KV index built from the groups' real KV events, although A's match on both groups, so the routing
  policy's decision for B equals its decision on an empty cache; and on two synthetic prefill groups, one holding
  A's prefix, B goes where it would go with no cache at all while A follows its cache;
- the timing side channel, stated as a test: n = 20 first-token latencies, measured by the client as an attacker
  would, of tenant B sending prompts whose prefix tenant A has cached (each a different prefix, so B's own
  cache never helps) against n = 20 of B sending random prompts of the same length, interleaved. Mann-Whitney U,
  two-sided, normal approximation with tie and continuity corrections, alpha = 0.001: the samples must NOT
  differ significantly. The same test on tenant A probing its own cached prefixes against random ones MUST find
  a difference (p < alpha), so the test has the power to fail. At alpha = 0.001 a correct implementation fails
  the first assertion once in a thousand runs.
"""

import asyncio
import math
import random
import time

import grpc
import pytest
from ray import serve

from cluster.app import build_app
from cluster.config import ClusterConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.kv_index import KVIndex, KVIndexFollower
from router.load_view import LoadView
from router.policy import GroupLoad, route
from workers.kv.hashing import hash_full_blocks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

APP, GRPC_PORT = "tandem-tenants", 17111
VOCAB, BLOCK = 49152, 16
PROMPT_LEN = 1000  # 62 full blocks: most of the tiny model's 1024-token context, so a cache hit saves the most
N, ALPHA = 20, 0.001
ONE_TOKEN = pb.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
A, B = "tenant-a", "tenant-b"


@pytest.fixture(scope="module")
def cluster(tiny_model_factory, redis_url):
    model = str(tiny_model_factory("llama"))
    # Room for every prompt below without eviction: a probe of an evicted prefix would prove nothing.
    config = ClusterConfig(model=model, num_kv_blocks=8192, num_cpus_per_rank=0.5, kv_transfer_timeout_s=10,
                           redis_url=redis_url, host="127.0.0.1", grpc_port=GRPC_PORT)
    serve.run(build_app(config), name=APP, route_prefix=None)
    yield
    serve.delete(APP)


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield tandem_pb2_grpc.GenerationStub(channel)


def prompt(seed: int, length: int = PROMPT_LEN) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, VOCAB) for _ in range(length)]


def first_token(stub, ids: list[int], salt: str) -> tuple[float, int]:
    """(seconds from sending to the first response, as the client sees them; cached tokens credited)."""
    start = time.perf_counter()
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=ONE_TOKEN, cache_salt=salt),
                         timeout=60)
    first = next(call)
    elapsed = time.perf_counter() - start
    return elapsed, [first, *call][-1].usage.cached_tokens


def mann_whitney_p(x: list[float], y: list[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test: normal approximation, ties get their mean rank (and shrink
    the variance), continuity correction 0.5."""
    n1, n2 = len(x), len(y)
    n = n1 + n2
    pooled = sorted((value, i) for i, value in enumerate(x + y))
    ranks, ties, i = [0.0] * n, 0.0, 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[pooled[k][1]] = (i + j) / 2 + 1
        ties += (j - i + 1) ** 3 - (j - i + 1)
        i = j + 1
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    z = max(0.0, abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(variance)
    return math.erfc(z / math.sqrt(2))


def test_the_u_test_matches_known_values():
    # scipy.stats.mannwhitneyu(x, y, method="asymptotic") gives 0.01219 for these and 1.0 for identical samples.
    assert mann_whitney_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(0.01219, abs=1e-4)
    assert mann_whitney_p([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert mann_whitney_p(list(range(20)), list(range(100, 120))) < 1e-6


# -- what the API reports ----------------------------------------------------------------------------------------

def test_another_tenants_prefix_earns_no_cached_tokens(stub):
    ids = prompt(1)
    full_blocks = (PROMPT_LEN - 1) // BLOCK * BLOCK  # the last token is always computed
    first_a = first_token(stub, ids, A)[1]
    repeat_a = first_token(stub, ids, A)[1]
    first_b = first_token(stub, ids, B)[1]
    repeat_b = first_token(stub, ids, B)[1]
    unsalted = first_token(stub, ids, "")[1]
    assert (first_a, first_b, unsalted) == (0, 0, 0)
    assert repeat_a == repeat_b == full_blocks
    assert first_token(stub, ids, A)[1] == full_blocks  # B's requests left A's cache as it was


# -- where the router sends a request ----------------------------------------------------------------------------

def test_on_the_live_index_tenant_b_matches_none_of_tenant_as_blocks(stub, redis_url):
    ids = prompt(2)
    first_token(stub, ids, A)
    a_hashes, b_hashes = hash_full_blocks(ids, BLOCK, A), hash_full_blocks(ids, BLOCK, B)
    assert not set(a_hashes) & set(b_hashes)

    async def scenario():
        follower, loads = KVIndexFollower(redis_url), LoadView(redis_url)
        await follower.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                reported = await loads.loads()
                if len(follower.index.match(a_hashes)) == 2 and reported.get("prefill") and reported.get("decode"):
                    return follower.index.match(a_hashes), follower.index.match(b_hashes), reported
                assert time.monotonic() < deadline, "the groups' KV events and loads did not reach Redis"
                await asyncio.sleep(0.1)
        finally:
            await follower.stop()
            await loads.close()

    a_match, b_match, loads = asyncio.run(scenario())
    assert set(a_match.values()) == {len(a_hashes)}  # the prefill group computed it, the decode group received it
    assert b_match == {}
    decide = lambda match: route(PROMPT_LEN, BLOCK, match, loads["prefill"], loads["decode"])  # noqa: E731
    assert decide(b_match) == decide({})
    assert decide(a_match).cached_blocks == (PROMPT_LEN - 1) // BLOCK


def test_tenant_b_is_routed_as_if_nothing_were_cached_while_tenant_a_follows_its_cache():
    """Two prefill groups: p0 holds A's prefix and has some work queued, p1 is idle. A's request goes to p0 (its
    cache saves more than the queue costs); B's goes to p1, exactly as with an empty index."""
    ids = prompt(3)
    index = KVIndex()
    index.add("p0", hash_full_blocks(ids, BLOCK, A))
    prefill = [GroupLoad("p0", free_blocks=900, total_blocks=1000, queued_prefill_tokens=400),
               GroupLoad("p1", free_blocks=1000, total_blocks=1000)]
    decode = [GroupLoad("d0", free_blocks=1000, total_blocks=1000)]

    def decide(salt: str | None):
        match = index.match(hash_full_blocks(ids, BLOCK, salt)) if salt else {}
        return route(PROMPT_LEN, BLOCK, match, prefill, decode)

    assert decide(A).prefill_group == "p0" and decide(A).cached_blocks == (PROMPT_LEN - 1) // BLOCK
    assert decide(B) == decide(None) and decide(B).prefill_group == "p1" and decide(B).cached_blocks == 0
    assert index.match(hash_full_blocks(ids, BLOCK)) == {}  # no salt is a tenant of its own too


# -- how long the first token takes ------------------------------------------------------------------------------

def test_first_token_latency_does_not_reveal_another_tenants_prefix(stub):
    """The side channel as an attacker would measure it (see the module's docstring for the test). Tenant A caches
    2N prefixes; B probes N of them, each once, and A the other N; each round sends one of each kind (B probing,
    B random, A probing, A random) in a shuffled order."""
    victim = [prompt(1000 + i) for i in range(2 * N)]
    for ids in victim:
        first_token(stub, ids, A)
    samples: dict[str, list[float]] = {"b probes a": [], "b random": [], "a probes a": [], "a random": []}
    credited: dict[str, list[int]] = {name: [] for name in samples}
    order = random.Random(0)
    for i in range(N):
        rounds = [("b probes a", victim[i], B), ("b random", prompt(5000 + i), B),
                  ("a probes a", victim[N + i], A), ("a random", prompt(9000 + i), A)]
        order.shuffle(rounds)  # against drift, and against whatever one kind of request does to the next
        for name, ids, salt in rounds:
            seconds, cached = first_token(stub, ids, salt)
            samples[name].append(seconds)
            credited[name].append(cached)
    assert set(credited["b probes a"]) == set(credited["b random"]) == set(credited["a random"]) == {0}
    assert set(credited["a probes a"]) == {(PROMPT_LEN - 1) // BLOCK * BLOCK}  # the prefixes were still cached
    p_b = mann_whitney_p(samples["b probes a"], samples["b random"])
    p_a = mann_whitney_p(samples["a probes a"], samples["a random"])
    medians = {name: f"{sorted(s)[N // 2] * 1000:.1f} ms" for name, s in samples.items()}
    print(f"first-token latency medians {medians}; p(B probing A) = {p_b:.3g}, p(A probing A) = {p_a:.3g}")
    assert p_b >= ALPHA, f"tenant B can tell A's prefixes from random ones: p = {p_b:.2g}, medians {medians}"
    assert p_a < ALPHA, f"the test cannot see a cache hit even for its owner: p = {p_a:.2g}, medians {medians}"
