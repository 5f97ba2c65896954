"""What the receiving group tells both groups to do with a KV channel, and how a transfer fails: plain data and
exceptions, with no torch, because they cross processes that never move a tensor (the pool replicas, which only
pass a decode group's commands to a prefill group's rank 0). workers/kv_transfer.py carries them out."""

from dataclasses import dataclass


class TransferError(RuntimeError):
    """The peer's KV layout differs, or the channel failed or timed out; the channel must be rebuilt."""


class TransferRefused(TransferError):
    """The sender refused before starting (the request's blocks are no longer pinned); the channel is intact."""


@dataclass(frozen=True)
class ChannelAddress:
    host: str
    port: int


@dataclass(frozen=True)
class OpenChannel:
    """Build a channel to a peer group, replacing any channel to it. Both groups run their half at the same time
    (building a process group is a rendezvous); rank r of the sending group pairs with rank r of the receiver."""

    role: str  # "send" or "recv"
    peer: str  # the other group: channels are cached per peer
    store: ChannelAddress  # the rendezvous store of the sending group, hosted by its rank 0
    channel: str  # the channel's name, chosen by the receiving group


@dataclass(frozen=True)
class TransferCommand:
    """One group's half of a transfer over an open channel. Every rank of the group runs the same command on its
    own KV heads."""

    direction: str  # "send" or "recv"
    request_id: str
    peer: str
    channel: str  # must name the open channel: a stale name means the peer rebuilt it, and the transfer fails
    block_ids: list[int]


@dataclass(frozen=True)
class DropChannel:
    """Close the channel to a peer (its transfer failed on the other side); the next transfer opens a new one."""

    peer: str


@dataclass(frozen=True)
class TransferPlan:
    """Both halves of moving one request's blocks, as the receiving group decided them: the channel to open
    first if there is none, then the send and the receive."""

    send: TransferCommand
    recv: TransferCommand
    open_send: OpenChannel | None = None
    open_recv: OpenChannel | None = None


KVCommand = OpenChannel | TransferCommand | DropChannel
