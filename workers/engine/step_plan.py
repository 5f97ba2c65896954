"""Rank 0 of a tensor-parallel group drives the others: one small typed message per step, not a scheduler each.

Only rank 0 runs the scheduler, the block manager and the sampler. Before each forward pass it broadcasts a
`StepPlan` over the group's CPU process group: for each scheduled request, how many tokens are computed and how
many are new, the token ids and block ids the follower has not seen yet (the whole prompt the first time, one
token and rarely a block afterwards), the step's guesses at its next tokens (speculative decoding), and the
requests that ended. Followers keep a mirror of each request (its
tokens and block table) and run the same forward pass on it; they never sample, since rank 0 alone decides.

Other commands (a KV transfer, copies to and from the host tier, a LoRA adapter to load or drop, stop) travel the
same way, so a follower does everything in the order rank 0 did it. Messages travel as JSON with a type name per
dataclass, and a follower rebuilds only the message types listed in `_MESSAGES`: the group's process group listens
on the network, and unpickling what arrives there would run whatever a sender put in it. This is the control plane,
a few hundred bytes per step; KV tensors never go through it.
"""

import json
import time
from dataclasses import dataclass, field, fields, is_dataclass

import torch
import torch.distributed as dist

from workers.engine.parallel import TensorParallel, group_failures
from workers.engine.sequence import Sequence
from workers.kv_commands import ChannelAddress, DropChannel, OpenChannel, TransferCommand


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    num_computed_tokens: int
    num_new_tokens: int
    new_token_ids: list[int]  # tokens the follower has not seen yet (all of them: it must know where each ends)
    new_block_ids: list[int]  # blocks appended to the table since the follower last saw it
    reset_blocks: bool = False  # the table was rebuilt (preemption): replace it with new_block_ids
    num_prompt_logprob_positions: int = 0  # the head runs on these positions too (all ranks take part)
    draft_token_ids: list[int] = field(default_factory=list)  # guesses computed after the next token (speculative.py)
    lora: str | None = None  # the request's LoRA adapter (lora.py)
    embed: bool = False  # an embedding request: its last token's row runs no head (sequence.py)


@dataclass(frozen=True)
class StepPlan:
    chunks: list[ScheduledChunk]
    finished: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stop:
    """The group is shutting down: followers leave their loop."""


@dataclass(frozen=True)
class LoadAdapter:
    """Rank 0 loaded a LoRA adapter (lora.py): each follower loads its shard of it before the next step."""

    name: str
    folder: str


@dataclass(frozen=True)
class DropAdapter:
    """Rank 0 dropped a LoRA adapter: so does each follower."""

    name: str


@dataclass(frozen=True)
class CopyBlocks:
    """KV blocks to copy between the cache and the host tier (block_manager.BlockCopy), in order, before the
    next step or transfer: each rank copies its shard."""

    copies: list[tuple[str, int, int]]


@dataclass
class MirroredRequest:
    """A follower's copy of what the model runner reads from a Sequence."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_prompt_logprob_positions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)
    lora: str | None = None
    embed: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class PlanWriter:
    """Rank 0's side: remembers what each follower has seen of each request, and sends only the difference."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self._sent: dict[str, tuple[int, list[int]]] = {}  # request id -> (tokens sent, block table sent)
        self._finished: list[str] = []
        # Running totals of what driving the followers costs rank 0 (serialising and broadcasting plans).
        self.bytes_sent = 0
        self.num_messages = 0
        self.seconds = 0.0

    def step(self, batch: list[tuple[Sequence, int]]) -> None:
        chunks = []
        for seq, num_new in batch:
            num_tokens_sent, blocks_sent = self._sent.get(seq.request_id, (0, []))
            table = seq.block_table
            reset = table[:len(blocks_sent)] != blocks_sent
            new_blocks = list(table) if reset else table[len(blocks_sent):]
            chunks.append(ScheduledChunk(seq.request_id, seq.num_computed_tokens, num_new,
                                         seq.token_ids[num_tokens_sent:], new_blocks, reset,
                                         seq.num_prompt_logprob_positions, list(seq.draft_token_ids), seq.lora,
                                         seq.embed))
            self._sent[seq.request_id] = (seq.num_tokens, list(table))
        self.send(StepPlan(chunks, self._finished))
        self._finished = []

    def finish(self, request_id: str) -> None:
        """The request ended on rank 0; followers drop their mirror with the next plan."""
        if self._sent.pop(request_id, None) is not None:
            self._finished.append(request_id)

    def send(self, message: object) -> None:
        start = time.perf_counter()
        data = encode(message)
        broadcast_bytes(data, self.tp)
        self.seconds += time.perf_counter() - start
        self.bytes_sent += len(data)
        self.num_messages += 1


class PlanReader:
    """A follower's side: receives messages and applies step plans to its mirrors."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self.requests: dict[str, MirroredRequest] = {}

    def receive(self) -> object:
        return decode(broadcast_bytes(None, self.tp))

    def apply(self, plan: StepPlan) -> list[tuple[MirroredRequest, int]]:
        """Brings the mirrors up to date and returns the batch exactly as rank 0 scheduled it."""
        for request_id in plan.finished:
            self.requests.pop(request_id, None)
        batch = []
        for chunk in plan.chunks:
            mirror = self.requests.setdefault(chunk.request_id, MirroredRequest(chunk.request_id))
            mirror.token_ids.extend(chunk.new_token_ids)
            if chunk.reset_blocks:
                mirror.block_table = list(chunk.new_block_ids)
            else:
                mirror.block_table.extend(chunk.new_block_ids)
            mirror.num_computed_tokens = chunk.num_computed_tokens
            mirror.num_prompt_logprob_positions = chunk.num_prompt_logprob_positions
            mirror.draft_token_ids = list(chunk.draft_token_ids)
            mirror.lora = chunk.lora
            mirror.embed = chunk.embed
            batch.append((mirror, chunk.num_new_tokens))
        return batch


def encode(message: object) -> bytes:
    """JSON, each dataclass as {type name: [field values in order]}: about 70 bytes per decoding request."""
    return json.dumps(_tagged(message), separators=(",", ":")).encode()


def decode(data: bytes) -> object:
    """The message `encode` made; anything else (a type not in _MESSAGES, the wrong fields) is a ValueError."""
    try:
        message = json.loads(data, object_hook=_untagged)
    except (TypeError, KeyError, RecursionError) as e:  # RecursionError: nesting deeper than any message
        raise ValueError(f"not a control message: {type(e).__name__}: {e}") from None
    if not isinstance(message, (StepPlan, Stop, LoadAdapter, DropAdapter, CopyBlocks, OpenChannel, TransferCommand,
                                DropChannel)):
        raise ValueError(f"not a control message: {type(message).__name__}")
    return message


def _tagged(value: object) -> object:
    if is_dataclass(value):
        return {type(value).__name__: [_tagged(getattr(value, f.name)) for f in fields(value)]}
    if isinstance(value, (list, tuple)):
        return [_tagged(item) for item in value]
    return value


def _untagged(obj: dict) -> object:
    [(name, values)] = obj.items() if len(obj) == 1 else [(None, None)]
    cls = _MESSAGES[name]
    if not isinstance(values, list) or len(values) != len(fields(cls)):
        raise TypeError(f"{name} takes {len(fields(cls))} fields")
    return cls(*values)


_FRAME = 16384  # one broadcast carries a plan up to this size (a step of a few dozen requests); larger ones take two
_LENGTH = 8


def broadcast_bytes(data: bytes | None, tp: TensorParallel) -> bytes:
    """Rank 0 passes the bytes, the others None; every rank returns them. Over the CPU group (on GPU the tensor
    group is NCCL, which cannot carry host memory). A fixed-size frame holds the length and the first bytes, so
    a usual plan is one broadcast, one round of latency, rather than a length and then a payload."""
    group = tp.cpu_group
    frame = torch.zeros(_FRAME, dtype=torch.uint8)
    if data is not None:
        head = data[:_FRAME - _LENGTH]
        frame[:_LENGTH] = torch.frombuffer(bytearray(len(data).to_bytes(_LENGTH, "little")), dtype=torch.uint8)
        frame[_LENGTH:_LENGTH + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    with group_failures():
        group.broadcast([frame], _root()).wait()
    length = int.from_bytes(frame[:_LENGTH].numpy().tobytes(), "little")
    rest = length - (_FRAME - _LENGTH)
    if rest > 0:
        tail = torch.frombuffer(bytearray(data[-rest:]), dtype=torch.uint8) if data is not None else \
            torch.empty(rest, dtype=torch.uint8)
        with group_failures():
            group.broadcast([tail], _root()).wait()
        if data is None:
            return frame[_LENGTH:].numpy().tobytes() + tail.numpy().tobytes()
    return data if data is not None else frame[_LENGTH:_LENGTH + length].numpy().tobytes()


def _root() -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options


# Every type a control message may be built from: step plans, stop, adapters, host-tier copies and the KV transfer
# commands.
_MESSAGES = {cls.__name__: cls for cls in (StepPlan, ScheduledChunk, Stop, LoadAdapter, DropAdapter, CopyBlocks,
                                           OpenChannel, TransferCommand, DropChannel, ChannelAddress)}
