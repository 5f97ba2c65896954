"""The device's two ceilings, measured in the run whose figures are compared with them: memory bandwidth (a large
device-to-device copy, counting the bytes read and the bytes written) and the matmul rate (a large product of
random matrices, never zeros, which run faster than real data).

Each figure is the median of several timed calls after warm-up calls; on CUDA the calls are timed with events.
"""

import statistics
import time
from collections.abc import Callable


def seconds_per_call(fn: Callable[[], object], device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one call of `fn` on `device`."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Bytes per second moved by copying 1 GiB (64 MiB on a CPU): 2 * size / time."""
    import torch

    size = 2**30 if device.type == "cuda" else 2**26
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / seconds_per_call(lambda: dst.copy_(src), device, repeats=20)


def matmul_rate(device, dtype) -> float:
    """FLOP/s of an n x n x n product in `dtype`: n = 8192 on CUDA, 512 on a CPU."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, repeats=10, warmup=3)
