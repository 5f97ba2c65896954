"""KV blocks from a prefill rank to a decode rank over a 2-rank torch.distributed group (gloo on CPU, NCCL on GPU).

Only raw tensors cross a channel: a small int64 header that both sides check, then the listed blocks of every
layer's K and V gathered into one contiguous buffer. Nothing is pickled.

Between groups: rank 0 of every group hosts a TCPStore on a port the OS picks; its address travels in the
handoff. The receiving group decides everything about a channel (a new name when it has none to that peer, one
transfer at a time per peer), and each of its commands runs on every rank of both groups, rank r pairing with
rank r. Opening a channel is a rendezvous, so both halves start together; a send then only starts (the payload
goes when the peer receives it), so a sender never blocks its engine on a slow receiver. Every rank of a group
applies the same commands in the same order, so their channel caches stay identical; when any rank fails, all
of them drop the channel, and the next transfer opens a new one. The commands themselves are plain data
(workers/kv_commands.py).
"""

import datetime
import socket
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.engine.parallel import TensorParallel, all_ranks_ok
from workers.kv_commands import ChannelAddress, DropChannel, KVCommand, OpenChannel, TransferError

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]

_MAGIC = 0x7A4B56  # "zKV": catches a peer speaking something else on the channel
_HEADER_TAG, _PAYLOAD_TAG = 0, 1
_SENDER, _RECEIVER = 0, 1


def listen(host: str | None = None, timeout: float = 30.0, world_size: int = 2) -> tuple[dist.TCPStore, ChannelAddress]:
    """The sending side's half of a rendezvous: a store on a free port of `host` (by default the address the host
    name resolves to), and the address the peer needs. Given only a host name, torch's TCPStore listens on every
    interface; handed a socket already bound to `host` (torch >= 2.8, pytorch#150215), it listens there only."""
    host = host or socket.gethostbyname(socket.gethostname())
    family, kind, proto, _, sockaddr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(sockaddr)
        port = sock.getsockname()[1]
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout),
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the socket now and closes it when it goes
    return store, ChannelAddress(host, port)


class KVChannel:
    """One direction of KV traffic between exactly two ranks; rank 0 sends, rank 1 receives."""

    def __init__(self, store: dist.Store, rank: int, device: torch.device, timeout: float = 30.0, name: str = ""):
        self.rank = rank
        self.name = name
        self.device = torch.device(device)
        self._store = store
        self._in_flight: PendingSend | None = None  # the last send, holding its buffers until the peer has it
        delta = datetime.timedelta(seconds=timeout)
        try:
            if self.device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = delta
                self._group = dist.ProcessGroupNCCL(store, rank, 2, options)
            else:
                self._group = dist.ProcessGroupGloo(store, rank, 2, delta)
        except RuntimeError as e:  # the peer never joined within the timeout
            raise TransferError(f"could not open a KV channel as rank {rank}: {e}") from e

    @classmethod
    def connect(cls, address: ChannelAddress, device: torch.device, timeout: float = 30.0) -> "KVChannel":
        """The receiving side's half of the rendezvous."""
        try:
            store = dist.TCPStore(address.host, address.port, 2, is_master=False,
                                  timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            raise TransferError(f"could not reach the KV channel at {address.host}:{address.port}: {e}") from e
        return cls(store, _RECEIVER, device, timeout)

    def send(self, kv_caches: KVCaches, block_ids: list[int]) -> "PendingSend":
        """Starts sending the listed blocks of every layer and returns at once: the sends complete when the peer
        receives them, so a sender never waits on its peer (only a receiver waits, on a sender that is moving).

        The previous send is finished first, which frees its buffers: the receiver asks for one transfer at a
        time on a channel, after the last one arrived, so that wait returns at once. (A gloo send's Work never
        reports itself completed until it is waited on, so finishing it is the only way to let it go.)"""
        self._expect(_SENDER)
        if self._in_flight is not None:
            self._in_flight.wait()
            self._in_flight = None
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        header = _header(kv_caches, len(block_ids))
        payload = _staging(kv_caches, len(block_ids))
        for layer, (k, v) in enumerate(kv_caches):
            torch.index_select(k, 0, ids, out=payload[layer, 0])
            torch.index_select(v, 0, ids, out=payload[layer, 1])
        works = [self._start(self._group.send, [header], _HEADER_TAG),
                 self._start(self._group.send, [payload], _PAYLOAD_TAG)]
        self._in_flight = PendingSend(works, (header, payload), _payload_bytes(kv_caches, len(block_ids)))
        return self._in_flight

    def recv(self, kv_caches: KVCaches, block_ids: list[int]) -> int:
        """Receives blocks into the listed block ids (the peer's ids may differ); returns the payload bytes."""
        self._expect(_RECEIVER)
        expected = _header(kv_caches, len(block_ids))
        header = torch.empty_like(expected)
        self._run(self._group.recv, [header], _HEADER_TAG)
        if not torch.equal(header, expected):
            raise TransferError(f"peer KV layout {header.tolist()} does not match ours {expected.tolist()} "
                                "(magic, layers, blocks, block shape, dtype)")
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        payload = _staging(kv_caches, len(block_ids))
        self._run(self._group.recv, [payload], _PAYLOAD_TAG)
        for layer, (k, v) in enumerate(kv_caches):
            k.index_copy_(0, ids, payload[layer, 0])
            v.index_copy_(0, ids, payload[layer, 1])
        return _payload_bytes(kv_caches, len(block_ids))

    def close(self) -> None:
        # Dropping the group and store closes their sockets; gloo has no explicit shutdown.
        self._group = None
        self._store = None
        self._in_flight = None

    def _expect(self, rank: int) -> None:
        if self._group is None:
            raise TransferError("channel is closed")
        if self.rank != rank:
            raise TransferError(f"rank {self.rank} of a channel cannot {'send' if rank == _SENDER else 'receive'}")

    def _start(self, op: Callable, tensors: list[torch.Tensor], tag: int) -> dist.Work:
        peer = _RECEIVER if self.rank == _SENDER else _SENDER
        try:
            return op(tensors, peer, tag)
        except RuntimeError as e:
            raise TransferError(f"KV transfer failed: {e}") from e

    def _run(self, op: Callable, tensors: list[torch.Tensor], tag: int) -> None:
        work = self._start(op, tensors, tag)
        try:
            work.wait()
        except RuntimeError as e:  # gloo and NCCL report timeouts and dead peers as RuntimeError
            raise TransferError(f"KV transfer failed: {e}") from e


@dataclass
class PendingSend:
    """Sends in flight, holding their buffers until the peer has them."""

    works: list[dist.Work]
    buffers: tuple[torch.Tensor, ...]
    nbytes: int

    def wait(self) -> int:
        """Returns once the peer has the data; again at once after that (a gloo Work waited on twice hangs)."""
        try:
            while self.works:
                self.works[0].wait()
                self.works.pop(0)
        except RuntimeError as e:
            raise TransferError(f"KV transfer failed: {e}") from e
        return self.nbytes


class ChannelCache:
    """Open channels keyed by peer, at most `capacity`; adding one more closes the least recently used."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._channels: OrderedDict[object, KVChannel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, key: object) -> KVChannel | None:
        channel = self._channels.get(key)
        if channel is not None:
            self._channels.move_to_end(key)
        return channel

    def put(self, key: object, channel: KVChannel) -> None:
        self.drop(key)
        while len(self._channels) >= self.capacity:
            _, oldest = self._channels.popitem(last=False)
            oldest.close()
        self._channels[key] = channel

    def drop(self, key: object) -> None:
        """Forget a channel after a failure so the next transfer rebuilds it."""
        channel = self._channels.pop(key, None)
        if channel is not None:
            channel.close()

    def clear(self) -> None:
        for key in list(self._channels):
            self.drop(key)


class KVEndpoint:
    """One rank's channels to other groups. Every rank of a group applies the same commands in the same order,
    so their caches stay identical and rank 0 can decide for all of them whether a channel must be opened."""

    def __init__(self, rank: int, device: torch.device, capacity: int = 8, timeout_s: float = 30.0):
        self.id = uuid.uuid4().hex  # how peers name this group (rank 0's id is the one that counts)
        self.rank = rank
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.channels = ChannelCache(capacity)
        # Running totals of the bytes this rank moved, exported as metrics.
        self.bytes_sent = 0
        self.bytes_received = 0
        self._listening: tuple[dist.TCPStore, ChannelAddress] | None = None

    def address(self) -> ChannelAddress:
        """Where peers rendezvous with this group (called on rank 0, which hosts the store for its group)."""
        if self._listening is None:
            self._listening = listen(timeout=self.timeout_s)
        return self._listening[1]

    def channel_for(self, peer: str) -> tuple[str, bool]:
        """The receiving side's choice: the open channel's name, or a new name and whether it must be opened."""
        channel = self.channels.get(peer)
        return (channel.name, False) if channel is not None else (uuid.uuid4().hex, True)

    def run(self, command: KVCommand, kv_caches: KVCaches) -> int:
        """Applies one command; returns the bytes moved. A send only starts (see KVChannel.send)."""
        if isinstance(command, DropChannel):
            self.channels.drop(command.peer)
            return 0
        if isinstance(command, OpenChannel):
            self._open(command)
            return 0
        channel = self.channels.get(command.peer)
        if channel is None or channel.name != command.channel:
            raise TransferError(f"no open KV channel {command.channel!r} to {command.peer}")
        if command.direction == "send":
            pending = channel.send(kv_caches, command.block_ids)
            self.bytes_sent += pending.nbytes
            return pending.nbytes
        nbytes = channel.recv(kv_caches, command.block_ids)
        self.bytes_received += nbytes
        return nbytes

    def close(self) -> None:
        self.channels.clear()
        self._listening = None

    def _open(self, command: OpenChannel) -> KVChannel:
        self.channels.drop(command.peer)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        if self._listening is not None and self._listening[1] == command.store:
            store = self._listening[0]
        else:
            try:
                store = dist.TCPStore(command.store.host, command.store.port, is_master=False, timeout=timeout)
            except RuntimeError as e:
                raise TransferError(f"could not reach the KV store at {command.store}: {e}") from e
        prefixed = dist.PrefixStore(f"{command.channel}/{self.rank}", store)
        role = _SENDER if command.role == "send" else _RECEIVER
        channel = KVChannel(prefixed, role, self.device, self.timeout_s, name=command.channel)
        self.channels.put(command.peer, channel)
        return channel


def run_transfer(endpoint: KVEndpoint, command: KVCommand, kv_caches: KVCaches,
                 tp: TensorParallel) -> int:
    """Runs a command on this rank, then agrees with the other ranks of the group: if any rank failed, every rank
    drops the channel (so all of them rebuild it together) and the transfer fails as a whole."""
    error: TransferError | None = None
    nbytes = 0
    try:
        nbytes = endpoint.run(command, kv_caches)
    except TransferError as e:
        error = e
    if not all_ranks_ok(error is None, tp):
        endpoint.channels.drop(command.peer)
        raise error or TransferError("another rank of the group failed its part of the KV transfer")
    return nbytes


def _header(kv_caches: KVCaches, num_blocks: int) -> torch.Tensor:
    k = kv_caches[0][0]
    dtype_code = [torch.float32, torch.bfloat16, torch.float16].index(k.dtype)
    return torch.tensor([_MAGIC, len(kv_caches), num_blocks, *k.shape[1:], dtype_code], dtype=torch.long,
                        device=k.device)


def _staging(kv_caches: KVCaches, num_blocks: int) -> torch.Tensor:
    """[layers, K|V, blocks, block_size, kv_heads, head_dim]: the whole transfer as one message, because each
    message is a rendezvous with the peer and per-layer messages cost more in waiting than in copying."""
    k = kv_caches[0][0]
    return torch.empty((len(kv_caches), 2, num_blocks, *k.shape[1:]), dtype=k.dtype, device=k.device)


def _payload_bytes(kv_caches: KVCaches, num_blocks: int) -> int:
    k = kv_caches[0][0]
    return 2 * len(kv_caches) * num_blocks * k[0].numel() * k.element_size()
