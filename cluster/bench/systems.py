"""The systems under test, each timed the same way: wall clock from the moment the requests exist until the last
token, and each request's time to first token measured from its own arrival.

torch, transformers and the engine are imported inside the functions because the CLI imports this package's
parser on every invocation.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cluster.bench.workloads import Tokens

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

RSS_METHOD = ("VmHWM from /proc/self/status, reset at the start of each phase by writing 5 to "
              "/proc/self/clear_refs: the kernel's exact peak resident memory of the whole process (every model "
              "loaded at the time, the KV cache, activations and the Python heap), with no sampling thread")


@dataclass
class Run:
    """What one system did with one workload; outputs and TTFTs are in request order."""

    outputs: list[Tokens]
    ttft_s: list[float]
    wall_s: float
    cached_tokens: int | None = None  # prompt tokens served from Tandem's prefix cache


@dataclass
class Rss:
    start_mib: float | None = None
    peak_mib: float | None = None


@contextmanager
def peak_rss() -> Iterator[Rss]:
    """Yields an Rss filled in when the block ends; both fields stay None where /proc is missing (not Linux).

    The kernel keeps the peak itself, so measuring costs nothing during the phase, unlike a sampling thread
    competing for the cores whose speed is being measured.
    """
    rss = Rss()
    if not _CLEAR_REFS.exists():
        yield rss
        return
    _CLEAR_REFS.write_text("5")
    rss.start_mib = _status_mib("VmRSS")
    yield rss
    rss.peak_mib = _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from {_STATUS}")


# -- HF transformers ------------------------------------------------------------------------------------------


def load_hf(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # `generate` fills an eos_token_id passed as None from this config, so clearing it here is the only way to
    # get exactly max_new_tokens, as Tandem does with ignore_eos.
    model.generation_config.eos_token_id = None
    return model


def warm_up_hf(model, prompt: Tokens, pad_id: int) -> None:
    """Runs the unpadded and the padded path once, so neither timed system pays first-call costs."""
    import torch

    ids = torch.tensor([prompt, [pad_id] + prompt[1:]])
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    _hf_generate(model, ids[:1], mask[:1], 2, pad_id, None)
    _hf_generate(model, ids, mask, 2, pad_id, None)


def hf_sequential(model, prompts: list[Tokens], output_tokens: int, pad_id: int, desc: str) -> Run:
    """One `generate` per prompt; all prompts arrive at t=0, so a request's TTFT includes waiting for those ahead."""
    import torch

    outputs, first_token_times = [], []
    start = time.monotonic()
    for prompt in tqdm(prompts, desc=desc, unit="req", mininterval=2):
        ids = torch.tensor([prompt])
        clock = _FirstTokenClock()
        outputs += _hf_generate(model, ids, torch.ones_like(ids), output_tokens, pad_id, clock)
        first_token_times.append(clock.first_token_time)
    wall = time.monotonic() - start
    return Run(outputs, [t - start for t in first_token_times], wall)


def hf_batched(model, prompts: list[Tokens], output_tokens: int, pad_id: int, batch_size: int, desc: str) -> Run:
    """Left-padded `generate` over consecutive batches in request order; a request's first token is its batch's."""
    import torch

    outputs, ttfts = [], []
    start = time.monotonic()
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", mininterval=2):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        clock = _FirstTokenClock()
        outputs += _hf_generate(model, ids, mask, output_tokens, pad_id, clock)
        ttfts += [clock.first_token_time - start] * len(batch)
    return Run(outputs, ttfts, time.monotonic() - start)


def _hf_generate(model, ids, mask, output_tokens: int, pad_id: int, clock) -> list[Tokens]:
    import torch

    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=output_tokens,
                             pad_token_id=pad_id, streamer=clock)
    new = out[:, ids.shape[1]:].tolist()
    if any(len(t) != output_tokens for t in new):
        raise RuntimeError(f"HF generated {[len(t) for t in new]} tokens, expected {output_tokens} each")
    return new


class _FirstTokenClock:
    """A `generate` streamer: the first put() carries the prompt, the second the first generated token(s)."""

    def __init__(self):
        self.puts = 0
        self.first_token_time: float | None = None

    def put(self, _value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_time = time.monotonic()

    def end(self) -> None:
        pass


# -- Tandem ---------------------------------------------------------------------------------------------------


def load_tandem(model_dir: Path, kv_cache_memory_gb: float, prefix_caching: bool, **engine_args):
    from workers.engine.llm import LLM

    return LLM(str(model_dir), kv_cache_memory_gb=kv_cache_memory_gb, enable_prefix_caching=prefix_caching,
               progress=False, **engine_args)


def warm_up_tandem(llm, prompt: Tokens) -> None:
    """First calls pay one-time costs (thread pools, allocator growth) that a long-running server pays once.

    Keep `prompt` shorter than a KV block so it leaves nothing in the prefix cache.
    """
    llm.generate(prompt, _greedy(2))


def tandem_waves(llm, waves: list[list[Tokens]], output_tokens: int, desc: str) -> Run:
    """Adds each wave at once and steps the engine until the wave is done, then adds the next.

    A wave arrives only when the previous one has finished, so TTFT never includes queueing behind an earlier
    wave: the cache-off run is not punished for falling behind, which would exaggerate the cache's benefit.
    """
    params = _greedy(output_tokens)
    engine = llm.engine
    finished = {}
    order = []
    start = time.monotonic()
    with tqdm(total=sum(map(len, waves)), desc=desc, unit="req", mininterval=2) as bar:
        for wave in waves:
            order += [engine.add_request(prompt, params) for prompt in wave]
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
    wall = time.monotonic() - start
    results = [finished[i] for i in order]
    bad = [r.request_id for r in results if r.error or len(r.outputs[0].token_ids) != output_tokens]
    if bad:
        raise RuntimeError(f"Tandem requests {bad} failed or did not generate exactly {output_tokens} tokens")
    return Run([r.outputs[0].token_ids for r in results], [r.metrics.ttft for r in results], wall,
               sum(r.num_cached_tokens for r in results))


def _greedy(max_tokens: int):
    from workers.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
