"""The console's throughput lines (`tandem serve`), computed from two snapshots of the groups' load reports as the
groups write them to Redis (workers/engine/async_engine.py's `_update_load`). tests/cluster/test_drain.py sees a
real server print them."""

import threading
import time

from cluster.commands.serve import _log_stats_until
from cluster.redis_server import LocalRedis
from cluster.stats_log import pool_lines


def report(role: str, **fields) -> dict:
    base = dict(running_seqs=0, waiting_seqs=0, pinned_seqs=0, free_blocks=100, total_blocks=100, prompt_tokens=0,
                cached_prompt_tokens=0, computed_prompt_tokens=0, generated_tokens=0)
    return {"role": role, **base, **fields}


def test_each_pool_sums_its_groups_rates_over_the_interval_and_their_load_now():
    before = {"d1": report("decode", generated_tokens=1000, prompt_tokens=500, cached_prompt_tokens=100),
              "d2": report("decode", generated_tokens=50),
              "p1": report("prefill", computed_prompt_tokens=4000, prompt_tokens=4000)}
    now = {"d1": report("decode", generated_tokens=1400, prompt_tokens=900, cached_prompt_tokens=400,
                        running_seqs=3, free_blocks=60),
           "d2": report("decode", generated_tokens=150, waiting_seqs=2, free_blocks=90),
           "p1": report("prefill", computed_prompt_tokens=5000, prompt_tokens=6000, cached_prompt_tokens=1000,
                        generated_tokens=10, pinned_seqs=4)}
    decode, prefill = pool_lines(before, now, elapsed_s=10.0)
    assert (decode.role, decode.groups, prefill.role, prefill.groups) == ("decode", 2, "prefill", 1)
    assert decode.generated_tokens_per_s == 50.0  # (400 + 100) / 10
    assert decode.cached_pct == 75.0  # 300 of the 400 prompt tokens finished in the interval
    assert (decode.running, decode.waiting, decode.kv_used_pct) == (3, 2, 25.0)  # 50 of 200 blocks
    assert prefill.computed_prompt_tokens_per_s == 100.0 and prefill.cached_pct == 50.0
    assert str(decode) == "decode pool, 2 groups: generation 50.0 tok/s, running 3, waiting 2, KV cache 25.0% used"
    assert str(prefill) == ("prefill pool, 1 group: prompt 100.0 tok/s computed (50% cached), running 0, waiting 0, "
                            "awaiting decode 4, KV cache 0.0% used")
    unified = pool_lines({}, {"u": report("decode", computed_prompt_tokens=80, prompt_tokens=100,
                                          cached_prompt_tokens=20, generated_tokens=30)}, elapsed_s=1.0)
    assert str(unified[0]).startswith("decode pool, 1 group: prompt 80.0 tok/s computed (20% cached), generation 30.0")
    offloading = pool_lines({}, {"p": report("prefill", host_blocks=400, host_blocks_used=100)}, elapsed_s=1.0)
    assert str(offloading[0]).endswith("KV cache 0.0% used, host tier 25.0% used")


def test_a_new_or_restarted_group_counts_from_zero_and_an_idle_pool_is_not_busy():
    before = {"old": report("decode", generated_tokens=900)}
    restarted = pool_lines(before, {"old": report("decode", generated_tokens=30)}, elapsed_s=1.0)
    new = pool_lines({}, {"new": report("decode", generated_tokens=30)}, elapsed_s=1.0)
    assert restarted[0].generated_tokens_per_s == new[0].generated_tokens_per_s == 30.0
    quiet = {"p": report("prefill", prompt_tokens=700, cached_prompt_tokens=300)}
    [idle] = pool_lines(quiet, quiet, elapsed_s=1.0)
    assert not idle.busy and idle.cached_pct is None  # no request finished in the interval: no hit rate to give
    assert str(idle).startswith("prefill pool, 1 group: prompt 0.0 tok/s computed, running 0")


def test_a_redis_outage_is_told_once_as_it_begins_and_once_as_it_ends(capsys):
    server = LocalRedis()
    stop = threading.Event()
    console = threading.Thread(target=_log_stats_until, args=(stop, server.url, 0.1))
    console.start()
    time.sleep(0.4)
    server.stop()
    time.sleep(0.8)  # several intervals without Redis
    server = LocalRedis(port=server.port)
    time.sleep(0.4)
    stop.set()
    console.join()
    server.stop()
    told = [line for line in capsys.readouterr().err.splitlines() if "load reports" in line]
    assert len(told) == 2, told
    assert told[0].startswith("tandem: no load reports (ConnectionError") and "served meanwhile" in told[0]
    assert told[1] == "tandem: load reports readable again"
