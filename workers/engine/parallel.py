"""Tensor parallelism inside the model: which rank of how many this process is, and the two collectives it needs.

The object is passed down to the layers that shard, never kept in a global, so one process can build models of
different parallel sizes (as tests do) and a layer's constructor shows whether it communicates. The collectives
call the process group's own methods rather than `torch.distributed.all_reduce`, so a standalone group built from
a store (no default world) works as well as one from `init_process_group`. At size 1 both are no-ops.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from workers.engine.errors import GroupBrokenError


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: ProcessGroup | None = None
    # Host-side messages (step plans, agreement on a transfer). On CPU it is `group` itself; on GPU a gloo group
    # beside the NCCL one, since NCCL only moves device memory.
    cpu_group: ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor parallel rank {self.rank} is not in [0, {self.size})")
        if self.size > 1 and self.group is None:
            raise ValueError(f"tensor parallel size {self.size} needs a process group shared by its ranks")
        if self.cpu_group is None:
            object.__setattr__(self, "cpu_group", self.group)

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler and drives the others."""
        return self.rank == 0


@dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads [first_head, +num_heads), KV heads [first_kv_head, +num_kv_heads)."""

    num_heads: int
    num_kv_heads: int
    first_head: int
    first_kv_head: int


def divide(total: int, tp: TensorParallel, what: str) -> int:
    if total % tp.size:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor parallel size ({tp.size})")
    return total // tp.size


def shard_heads(num_heads: int, num_kv_heads: int, tp: TensorParallel) -> HeadShard:
    """Splits query heads evenly; KV heads are split too when there are at least as many as ranks, else each is
    replicated on the ranks whose query heads read it (vLLM's layout), since a KV head cannot be cut in two."""
    local = divide(num_heads, tp, "the number of attention heads")
    if num_kv_heads >= tp.size:
        local_kv = divide(num_kv_heads, tp, "the number of key/value heads")
        return HeadShard(local, local_kv, tp.rank * local, tp.rank * local_kv)
    if tp.size % num_kv_heads:
        raise ValueError(f"the tensor parallel size ({tp.size}) must be a multiple of the number of key/value heads "
                         f"({num_kv_heads}) when it exceeds it, so each KV head is replicated evenly")
    return HeadShard(local, 1, tp.rank * local, tp.rank // (tp.size // num_kv_heads))


def all_reduce(x: torch.Tensor, tp: TensorParallel, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduces x in place across the ranks and returns it."""
    if tp.size == 1:
        return x
    tp.group.allreduce([x], op).wait()
    return x


def all_gather_last_dim(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Concatenates every rank's x along the last dimension, in rank order, on every rank."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    tp.group.allgather([parts], [x]).wait()
    return torch.cat(parts, dim=-1)


def all_ranks_ok(ok: bool, tp: TensorParallel) -> bool:
    """True on every rank if it is true on every rank."""
    if tp.size == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.long)
    with group_failures():
        tp.cpu_group.allreduce([flag], dist.ReduceOp.MIN).wait()
    return bool(flag.item())


@contextlib.contextmanager
def group_failures():
    """A collective of the group that fails (a peer rank died: its sockets closed) raises GroupBrokenError, so
    callers tell a broken group from a failed request."""
    try:
        yield
    except RuntimeError as e:
        raise GroupBrokenError(f"a rank of this tensor-parallel group is gone: {e}") from e
