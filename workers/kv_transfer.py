"""KV blocks from a prefill rank to a decode rank over a 2-rank torch.distributed group (gloo on CPU, NCCL on GPU).

Only raw tensors cross a channel: a small int64 header that both sides check, then the listed blocks of every
layer's K and V gathered into one contiguous buffer. Nothing is pickled. A channel is built on demand: the sending
side listens on a TCPStore at a port the OS picks, hands that address to its peer through the control plane,
and both sides then construct the group concurrently (the constructor is a rendezvous).
"""

import datetime
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]

_MAGIC = 0x7A4B56  # "zKV": catches a peer speaking something else on the channel
_HEADER_TAG, _PAYLOAD_TAG = 0, 1
_SENDER, _RECEIVER = 0, 1


class TransferError(RuntimeError):
    """The peer's KV layout differs, or the channel failed or timed out; the channel must be rebuilt."""


@dataclass(frozen=True)
class ChannelAddress:
    host: str
    port: int


def listen(host: str | None = None, timeout: float = 30.0) -> tuple[dist.TCPStore, ChannelAddress]:
    """The sending side's half of a rendezvous: a store on a free port, and the address the peer needs."""
    host = host or socket.gethostbyname(socket.gethostname())
    store = dist.TCPStore(host, 0, 2, is_master=True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    return store, ChannelAddress(host, store.port)


class KVChannel:
    """One direction of KV traffic between exactly two ranks; rank 0 sends, rank 1 receives."""

    def __init__(self, store: dist.Store, rank: int, device: torch.device, timeout: float = 30.0):
        self.rank = rank
        self.device = torch.device(device)
        self._store = store
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

    def send(self, kv_caches: KVCaches, block_ids: list[int]) -> int:
        """Sends the listed blocks of every layer; returns the payload size in bytes."""
        self._expect(_SENDER)
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self._run(self._group.send, [_header(kv_caches, len(block_ids))], _HEADER_TAG)
        payload = _staging(kv_caches, len(block_ids))
        for layer, (k, v) in enumerate(kv_caches):
            torch.index_select(k, 0, ids, out=payload[layer, 0])
            torch.index_select(v, 0, ids, out=payload[layer, 1])
        self._run(self._group.send, [payload], _PAYLOAD_TAG)
        return _payload_bytes(kv_caches, len(block_ids))

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

    def _expect(self, rank: int) -> None:
        if self._group is None:
            raise TransferError("channel is closed")
        if self.rank != rank:
            raise TransferError(f"rank {self.rank} of a channel cannot {'send' if rank == _SENDER else 'receive'}")

    def _run(self, op: Callable, tensors: list[torch.Tensor], tag: int) -> None:
        peer = _RECEIVER if self.rank == _SENDER else _SENDER
        try:
            op(tensors, peer, tag).wait()
        except RuntimeError as e:  # gloo and NCCL report timeouts and dead peers as RuntimeError
            raise TransferError(f"KV transfer failed: {e}") from e


class ChannelCache:
    """Open channels keyed by peer, at most `capacity`; opening one more closes the least recently used."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._channels: OrderedDict[object, KVChannel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, key: object, open_channel: Callable[[], KVChannel]) -> KVChannel:
        if key in self._channels:
            self._channels.move_to_end(key)
            return self._channels[key]
        while len(self._channels) >= self.capacity:
            _, oldest = self._channels.popitem(last=False)
            oldest.close()
        channel = self._channels[key] = open_channel()
        return channel

    def drop(self, key: object) -> None:
        """Forget a channel after a failure so the next transfer rebuilds it."""
        channel = self._channels.pop(key, None)
        if channel is not None:
            channel.close()


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
