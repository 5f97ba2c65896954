"""Rank 0's step plans: a follower's mirror of each request matches rank 0's sequence after every step, while a
plan carries only what changed (the whole prompt once, then a token and now and then a block)."""

import datetime
import pickle
import random
import threading

import pytest
import torch.distributed as dist

from workers.engine.parallel import TensorParallel
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence
from workers.engine.step_plan import (
    CopyBlocks,
    DropAdapter,
    LoadAdapter,
    PlanReader,
    PlanWriter,
    ScheduledChunk,
    StepPlan,
    Stop,
    broadcast_bytes,
    decode,
    encode,
)
from workers.kv_commands import ChannelAddress, DropChannel, OpenChannel, TransferCommand
from workers.kv_transfer import listen


def two_ranks(rank0, rank1):
    """Runs rank0(tp) and rank1(tp) on two threads joined by a real gloo group; returns their results."""
    store, address = listen("127.0.0.1", timeout=30)
    results = [None, None]

    def run(rank, fn):
        client = dist.TCPStore(address.host, address.port, is_master=False)
        group = dist.ProcessGroupGloo(client, rank, 2, datetime.timedelta(seconds=30))
        results[rank] = fn(TensorParallel(rank, 2, group))

    threads = [threading.Thread(target=run, args=(r, fn)) for r, fn in enumerate((rank0, rank1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_broadcast_carries_payloads_of_any_size_around_the_frame():
    rng = random.Random(0)
    payloads = [bytes(rng.randrange(256) for _ in range(n)) for n in (1, 100, 16375, 16376, 16377, 50_000)]
    sent, received = two_ranks(lambda tp: [broadcast_bytes(p, tp) for p in payloads],
                               lambda tp: [broadcast_bytes(None, tp) for _ in payloads])
    assert sent == received == payloads


def test_mirrors_follow_rank_0_through_decode_preemption_and_finish():
    seq = Sequence("a", list(range(20)), SamplingParams(), block_size=16)
    seq.block_table = [3, 5]

    def state(s):
        return list(s.token_ids), list(s.block_table), s.num_computed_tokens

    def rank0(tp):
        writer, expected = PlanWriter(tp), []
        steps = [
            lambda: None,  # prefill of the whole prompt
            lambda: (setattr(seq, "num_computed_tokens", 20), seq.append_token(100)),  # decode, same blocks
            lambda: (seq.append_token(101), setattr(seq, "num_computed_tokens", 21)),
            lambda: (seq.reset_for_recompute(), setattr(seq, "block_table", [7, 8])),  # preempted, re-admitted
        ]
        for change in steps:
            change()
            num_new = seq.num_tokens - seq.num_computed_tokens
            writer.step([(seq, num_new)])
            expected.append((state(seq), num_new))
        writer.finish("a")
        writer.step([])
        return expected

    def rank1(tp):
        reader, seen = PlanReader(tp), []
        for _ in range(4):
            [(mirror, num_new)] = reader.apply(reader.receive())
            seen.append((state(mirror), num_new))
        reader.apply(reader.receive())
        return seen, dict(reader.requests)

    expected, (seen, left) = two_ranks(rank0, rank1)
    assert seen == expected
    assert left == {}


def test_a_decode_plan_carries_only_the_new_token_and_the_new_block():
    seq = Sequence("b", list(range(31)), SamplingParams(), block_size=16)
    seq.block_table = [1, 2]
    messages = []

    def rank0(tp):
        writer = PlanWriter(tp)
        writer.send = messages.append  # look at the message itself; broadcasting is the previous test
        writer.step([(seq, 31)])
        seq.num_computed_tokens = 31
        seq.append_token(500)
        seq.block_table.append(4)
        writer.step([(seq, 1)])

    rank0(TensorParallel())
    first, second = (m.chunks[0] for m in messages)
    assert first.new_token_ids == list(range(31)) and first.new_block_ids == [1, 2]
    assert second.new_token_ids == [500] and second.new_block_ids == [4] and not second.reset_blocks
    assert (second.num_computed_tokens, second.num_new_tokens) == (31, 1)


def test_control_messages_round_trip_and_nothing_else_is_rebuilt():
    """The group's process group listens on the network: a follower rebuilds the control message types and
    nothing else, so bytes crafted as a pickle or naming another type are refused, never executed."""
    messages = [StepPlan([ScheduledChunk("r1", 16, 1, [5], [3]), ScheduledChunk("r2", 0, 40, list(range(40)),
                                                                             [1, 2, 3], reset_blocks=True)], ["x"]),
                Stop(), OpenChannel("send", "peer", ChannelAddress("10.0.0.2", 29500), "c1"),
                TransferCommand("recv", "r1", "peer", "c1", [4, 5]), DropChannel("peer"),
                LoadAdapter("sql@1", "/adapters/sql"), DropAdapter("sql@1"), CopyBlocks([["out", 3, 0], ["in", 0, 5]])]
    assert [decode(encode(m)) for m in messages] == messages
    for hostile in (pickle.dumps(Stop()), b'{"os.system": ["true"]}', b'{"Stop": [1]}', b'{"Stop": {}}',
                    b'{"StepPlan": [[], []], "Stop": []}', b'{}',
                    b'[1, 2]', b'{"ChannelAddress": ["h", 1]}'):
        with pytest.raises(ValueError):
            decode(hostile)
