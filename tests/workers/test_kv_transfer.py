"""KV blocks cross a real 2-process gloo channel bit for bit, into different block ids, and failures are clean
TransferErrors rather than hangs."""

import multiprocessing as mp
import time

import pytest
import torch

from workers.kv_commands import TransferError
from workers.kv_transfer import ChannelCache, KVChannel, listen

pytestmark = pytest.mark.slow

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 12, 16, 2, 8
SRC_IDS, DST_IDS = [7, 2, 9, 4], [0, 5, 1, 11]


def caches(seed: int | None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    make = (lambda: torch.randn(BLOCKS, BS, HEADS, DIM, generator=gen).to(dtype)) if gen else \
        (lambda: torch.zeros(BLOCKS, BS, HEADS, DIM, dtype=dtype))
    return [(make(), make()) for _ in range(LAYERS)]


def _sender(addresses: mp.Queue, results: mp.Queue, dtype_name: str) -> None:
    store, address = listen("127.0.0.1", timeout=20)
    addresses.put(address)
    channel = KVChannel(store, 0, torch.device("cpu"), timeout=20)
    try:
        results.put(("sent", channel.send(caches(0, getattr(torch, dtype_name)), SRC_IDS).wait()))
    except TransferError as e:
        results.put(("send-error", str(e)))


def _receiver(addresses: mp.Queue, results: mp.Queue) -> None:
    channel = KVChannel.connect(addresses.get(timeout=20), torch.device("cpu"), timeout=20)
    dst = caches(None)
    try:
        nbytes = channel.recv(dst, DST_IDS)
    except TransferError as e:
        results.put(("recv-error", str(e)))
        return
    src = caches(0)
    ok = all(torch.equal(d[DST_IDS], s[SRC_IDS]) for (dk, dv), (sk, sv) in zip(dst, src)
             for d, s in ((dk, sk), (dv, sv)))
    untouched = all(not t[[i for i in range(BLOCKS) if i not in DST_IDS]].any() for kv in dst for t in kv)
    results.put(("received", nbytes, ok, untouched))


def run_pair(dtype_name: str = "float32") -> list[tuple]:
    ctx = mp.get_context("spawn")
    addresses, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(addresses, results, dtype_name)),
             ctx.Process(target=_receiver, args=(addresses, results))]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return out


def test_blocks_arrive_bit_identical_in_the_receivers_own_block_ids():
    out = dict((r[0], r[1:]) for r in run_pair())
    expected_bytes = 2 * LAYERS * len(SRC_IDS) * BS * HEADS * DIM * 4
    assert out["sent"] == (expected_bytes,)
    assert out["received"] == (expected_bytes, True, True)


def test_a_peer_with_another_kv_layout_is_refused():
    out = dict((r[0], r[1:]) for r in run_pair("bfloat16"))
    assert "recv-error" in out and "does not match" in out["recv-error"][0]


def test_a_peer_that_never_joins_times_out_with_a_transfer_error():
    store, address = listen("127.0.0.1", timeout=2)
    start = time.monotonic()
    with pytest.raises(TransferError):
        KVChannel.connect(address, torch.device("cpu"), timeout=2)
    assert time.monotonic() - start < 30
    del store


class FakeChannel:
    """Stands in for a channel in the cache's bookkeeping test: opening real groups is not what is under test."""

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_channel_cache_closes_the_least_recently_used_channel_first():
    cache = ChannelCache(capacity=2)
    a, b, c = FakeChannel(), FakeChannel(), FakeChannel()
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("c", c)
    assert b.closed and not a.closed and len(cache) == 2 and cache.get("b") is None
    cache.drop("a")
    assert a.closed and len(cache) == 1


def test_replacing_a_peers_channel_closes_the_old_one():
    cache = ChannelCache(capacity=2)
    old, new = FakeChannel(), FakeChannel()
    cache.put("a", old)
    cache.put("a", new)
    assert old.closed and cache.get("a") is new and len(cache) == 1


def test_a_sender_holds_the_buffers_of_one_send_per_channel_not_of_every_send():
    """A gloo send's Work never reports itself completed until it is waited on, so a sender that kept each send
    until it reported completion kept every payload of a long run (117 MB/min on a 30-minute soak). The channel
    finishes the previous send when the next starts and lets its buffers go, and the last one when it closes."""
    import threading
    import weakref

    store, address = listen("127.0.0.1", timeout=20)
    rounds, payloads = 5, []

    def receive() -> None:
        channel = KVChannel.connect(address, torch.device("cpu"), timeout=20)
        for _ in range(rounds):
            channel.recv(caches(None), DST_IDS)

    receiver = threading.Thread(target=receive)
    receiver.start()
    sender = KVChannel(store, 0, torch.device("cpu"), timeout=20)
    src = caches(0)
    for _ in range(rounds):
        payloads.append(weakref.ref(sender.send(src, SRC_IDS).buffers[1]))
    receiver.join(timeout=60)
    assert [ref() is None for ref in payloads] == [True] * (rounds - 1) + [False]
    sender.close()
    assert payloads[-1]() is None
