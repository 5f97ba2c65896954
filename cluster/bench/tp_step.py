"""The per-step cost of rank 0 driving its followers in a tensor-parallel group.

`size` processes share a gloo group, as the ranks of a worker group do. Rank 0 runs a batch of requests through
the engine; its PlanWriter times every step plan it serialises and broadcasts. The figure to read is that time
per step against the whole step's time, on a decode-heavy batch where steps are shortest and the share largest.
"""

import datetime
import time


def _rank(rank: int, size: int, port: int, model: str, num_requests: int, max_tokens: int, results) -> None:
    import torch
    import torch.distributed as dist

    from workers.engine.config import CacheConfig, EngineConfig, ModelConfig
    from workers.engine.follower import Follower
    from workers.engine.llm_engine import LLMEngine
    from workers.engine.parallel import TensorParallel
    from workers.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=300))
    tp = TensorParallel(rank, size, dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=300)))
    config = EngineConfig(ModelConfig(model), CacheConfig(num_kv_blocks=512))
    if rank:
        Follower(config, tp).run()
        return
    engine = LLMEngine(config, tp=tp)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(num_requests):
        engine.add_request(f"Request {i}: write a short poem about the number {i}.", params)
    writer = engine.runner.followers
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    total = time.perf_counter() - start
    results.put(dict(tensor_parallel_size=size, requests=num_requests, steps=steps, step_ms=total / steps * 1e3,
                     plan_us=writer.seconds / writer.num_messages * 1e6,
                     plan_bytes=writer.bytes_sent / writer.num_messages,
                     share=writer.seconds / total))
    engine.shutdown()


def measure(model: str, size: int, num_requests: int = 16, max_tokens: int = 32) -> dict:
    """Rank 0's figures: steps, mean step time, mean time and bytes of a step plan, and their share."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, size, store.port, model, num_requests, max_tokens, results))
             for r in range(size)]
    for p in procs:
        p.start()
    row = results.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return row


def table(row: dict) -> str:
    return "\n".join([
        f"Tensor-parallel step overhead: rank 0 driving {row['tensor_parallel_size'] - 1} follower(s), "
        f"{row['requests']} requests decoding together",
        f"{'steps':>6}  {'step ms':>8}  {'plan us/step':>12}  {'plan bytes':>10}  {'share of step':>13}",
        f"{row['steps']:>6}  {row['step_ms']:>8.1f}  {row['plan_us']:>12.0f}  {row['plan_bytes']:>10.0f}  "
        f"{row['share'] * 100:>12.2f}%",
    ])
