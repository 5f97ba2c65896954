"""`tandem bench serve`: a running deployment under load through its public APIs, measured as its clients see it.

What vLLM's `vllm bench serve` does, for Tandem and any OpenAI-compatible server: requests arrive at a set rate
(Poisson) or all at once, at most --max-concurrency at a time, each one streamed; measured per request are the
time to first token (TTFT), the time per output token after it (TPOT), the gaps between streamed chunks (ITL) and
the whole request's latency, and overall the request and token throughput. The prompts are cut from real English
text (the standard library's docstrings, as `tandem bench engine` does) with the model's tokenizer, or read from a
ShareGPT or JSONL file, so every target gets the same token ids: HTTP completions and gRPC `Generate` send them as
ids, chat sends their text.

Several --url targets run the same requests with the same arrival times, one after the other, so one run compares
the gRPC and HTTP front doors of a cluster, or Tandem and another server: the table has a column of ratios to the
first target for each other one. Each target's requests carry a fresh cache_salt, so targets on one cluster, and
runs repeated against one server, each start with none of their prompts cached (--no-isolate-cache leaves it out).
"""

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cluster.bench.report import percentile

APIS = ("completions", "chat")
DATASETS = ("random", "shared-prefix", "sharegpt", "jsonl")
# vLLM's bounds on ShareGPT conversations, so the two benches draw the same requests from the same file.
SHAREGPT_MIN_TOKENS, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
TOP_ERRORS = 3  # distinct error messages printed per target
WARM_UP_TOKENS = 8
SLO_NAMES = ("ttft", "tpot", "e2el")  # vLLM's --goodput names: time to first token, per output token, end to end
# The stages of the time to first token that Tandem's gRPC responses report (cluster.client.TimeToFirstToken).
TTFT_STAGES = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer", "first_decode_step")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", action="append", default=None, metavar="URL",
                        help="a target, repeatable: http(s)://HOST:PORT for the OpenAI HTTP API, HOST:PORT (or "
                             "grpc:// / grpcs://) for Tandem's gRPC API (default: http://localhost:8000)")
    parser.add_argument("--api", choices=APIS, default="completions",
                        help="completions (the prompt as token ids; gRPC Generate) or chat (the prompt's text as "
                             "a user message; gRPC Chat)")
    parser.add_argument("--model", default=None,
                        help="the name requests give as `model` (default: the first one each target lists)")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME",
                        help="LoRA adapters the target serves: each request names one of them as its `model`, drawn "
                             "at random (seeded by --seed), as vLLM's bench does")
    parser.add_argument("--tokenizer", default="smollm2",
                        help="the model whose tokenizer cuts the prompts: smollm2, a HF folder or a .gguf file")
    parser.add_argument("--dataset", choices=DATASETS, default="random",
                        help="random: independent prompts; shared-prefix: --num-prefixes system prompts of "
                             "--prefix-len tokens, each followed by its own --input-len tokens; sharegpt: the first "
                             "turns of ShareGPT conversations (--dataset-path, a JSON file, as vLLM's bench reads "
                             "it: each reply's length is its request's output length); jsonl: a JSON object a line "
                             "(--dataset-path) with a \"prompt\" and optionally \"output_tokens\"")
    parser.add_argument("--dataset-path", default=None, help="the file of --dataset sharegpt or jsonl")
    parser.add_argument("--num-prompts", type=int, default=100,
                        help="requests sent to each target (default: %(default)s)")
    parser.add_argument("--input-len", type=int, default=256,
                        help="prompt tokens, after any shared prefix (default: %(default)s)")
    parser.add_argument("--input-range-ratio", type=float, default=0.0,
                        help="prompt lengths drawn from input-len x [1 - r, 1 + r] (random dataset)")
    parser.add_argument("--output-len", type=int, default=64,
                        help="tokens generated per request (default: %(default)s)")
    parser.add_argument("--prefix-len", type=int, default=512,
                        help="tokens per shared system prompt (default: %(default)s)")
    parser.add_argument("--num-prefixes", type=int, default=4,
                        help="distinct shared system prompts (default: %(default)s)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, arriving as a Poisson process (default: inf, all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="requests in flight at most; later arrivals wait for one to end")
    parser.add_argument("--goodput", nargs="+", default=[], metavar="SLO",
                        help="service-level objectives in ms, as vLLM's: ttft:MS, tpot:MS, e2el:MS; goodput is the "
                             "requests a second that meet every one")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate exactly --output-len tokens (vLLM's ignore_eos)")
    parser.add_argument("--isolate-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="a fresh cache_salt (Tandem's and vLLM's) for each target in each run, so no run finds "
                             "the prompts of an earlier one cached on the same server")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--api-key", default=None,
                        help="bearer token (default: $TANDEM_API_KEY, else $OPENAI_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may take (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    parser.add_argument("--json", default="bench-results/serve.json", help="where to write the figures")


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str  # what chat sends
    output_tokens: int  # max_tokens


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds from when it was sent."""

    ok: bool = False
    error: str = ""
    model: str = ""  # the `model` it named
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks that carried tokens
    chunks: int = 0  # streamed chunks that carried tokens
    # Where the server says the time to first token went (Tandem's gRPC API): stage -> seconds.
    server_ttft_s: dict[str, float] | None = None

    def chunk_arrived(self, at_s: float) -> None:
        if self.chunks == 0:
            self.ttft_s = at_s
        else:
            self.itl_s.append(at_s - self.latency_s)
        self.chunks += 1
        self.latency_s = at_s

    def end(self, at_s: float) -> "Outcome":
        self.latency_s = at_s
        self.ok = self.chunks > 0
        self.error = "" if self.ok else "the stream ended without a token"
        return self

    def meets(self, slos_ms: dict[str, float]) -> bool:
        """Within every objective (a one-token reply has no TPOT to miss)."""
        tpot = self.tpot_s
        measured = dict(ttft=self.ttft_s, tpot=0.0 if tpot is None else tpot, e2el=self.latency_s)
        return self.ok and all(measured[name] * 1000 <= limit for name, limit in slos_ms.items())

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for a one-token reply."""
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class Summary:
    target: str
    completed: int
    failed: int
    duration_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_ms: dict[str, float | None]  # mean, p50, p90, p99 (None without a value)
    tpot_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    latency_s: dict[str, float | None]
    server_ttft_ms: dict[str, float] | None  # stage -> mean, where the server reports them
    good: int | None  # requests within every --goodput objective; None without objectives
    errors: dict[str, int]  # message -> requests that failed with it
    requests: list[Outcome]  # in prompt order, for the JSON file

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.duration_s

    @property
    def goodput_per_s(self) -> float | None:
        return None if self.good is None else self.good / self.duration_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.duration_s

    def as_dict(self) -> dict:
        return asdict(self) | dict(requests_per_s=self.requests_per_s, goodput_per_s=self.goodput_per_s,
                                   output_tokens_per_s=self.output_tokens_per_s,
                                   total_tokens_per_s=self.total_tokens_per_s)


class HttpTarget:
    """The OpenAI-compatible HTTP API (Tandem's, vLLM's, ...), streamed as server-sent events."""

    def __init__(self, url: str, api: str, api_key: str | None, timeout: float):
        import aiohttp

        self._base = url.rstrip("/").removesuffix("/v1")
        self._api = api
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout))

    async def models(self) -> list[str]:
        async with self._session.get(f"{self._base}/v1/models") as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise RuntimeError(f"GET /v1/models: HTTP {response.status}: {_message(body)}")
            return [model["id"] for model in body["data"]]

    async def send(self, prompt: Prompt, model: str, sampling: dict) -> Outcome:
        import aiohttp

        if self._api == "chat":
            path, body = "/v1/chat/completions", dict(messages=[{"role": "user", "content": prompt.text}],
                                                      max_completion_tokens=prompt.output_tokens)
        else:
            path, body = "/v1/completions", dict(prompt=prompt.token_ids, max_tokens=prompt.output_tokens)
        body |= dict(model=model, stream=True, stream_options={"include_usage": True}) | sampling
        outcome = Outcome()
        started = time.perf_counter()
        try:
            async with self._session.post(self._base + path, json=body) as response:
                if response.status != 200:
                    outcome.error = f"HTTP {response.status}: {_message(await response.json(content_type=None))}"
                    return outcome
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line.decode().removeprefix("data:").strip()
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        outcome.error = f"in the stream: {_message(chunk)}"
                        return outcome
                    if _has_tokens(chunk):
                        outcome.chunk_arrived(time.perf_counter() - started)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        outcome.prompt_tokens, outcome.output_tokens = usage["prompt_tokens"], \
                            usage["completion_tokens"]
                        outcome.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
            outcome.error = f"{type(e).__name__}: {e}"
            return outcome
        outcome.output_tokens = outcome.output_tokens or outcome.chunks  # a server that reports no usage
        return outcome.end(time.perf_counter() - started)

    async def close(self) -> None:
        await self._session.close()


class GrpcTarget:
    """Tandem's gRPC API through its own asyncio client; each chunk says which token ids it carries."""

    def __init__(self, url: str, api: str, api_key: str | None, timeout: float):
        from cluster.client import AsyncTandemClient

        parts = urlsplit(url if "//" in url else f"grpc://{url}")
        # No retries: a refused request counts as failed, as it does over HTTP here.
        self._client = AsyncTandemClient(parts.netloc, api_key=api_key, tls=parts.scheme == "grpcs", timeout=timeout,
                                         retries=0)
        self._api = api

    async def models(self) -> list[str]:
        return [model.id for model in await self._client.models(timeout=30)]

    async def send(self, prompt: Prompt, model: str, sampling: dict) -> Outcome:
        from cluster.client import TandemError

        if self._api == "chat":
            stream = self._client.chat_stream([{"role": "user", "content": prompt.text}], model=model,
                                              max_tokens=prompt.output_tokens, **sampling)
        else:
            stream = self._client.stream(prompt.token_ids, model=model, max_tokens=prompt.output_tokens, **sampling)
        outcome = Outcome()
        started = time.perf_counter()
        try:
            async with stream:
                async for chunk in stream:
                    if chunk.token_ids:
                        outcome.chunk_arrived(time.perf_counter() - started)
                    if chunk.ttft is not None:
                        outcome.server_ttft_s = {stage: getattr(chunk.ttft, f"{stage}_s") for stage in TTFT_STAGES}
                    if chunk.usage is not None:
                        outcome.prompt_tokens = chunk.usage.prompt_tokens
                        outcome.cached_tokens = chunk.usage.cached_tokens
                        outcome.output_tokens = chunk.usage.completion_tokens
        except TandemError as e:
            outcome.error = f"{e.code.name}: {e.details}"
            return outcome
        return outcome.end(time.perf_counter() - started)

    async def close(self) -> None:
        await self._client.close()


def target_kind(url: str) -> str:
    """"http" for http(s)://, "grpc" for grpc(s):// or a bare HOST:PORT; ValueError for anything else."""
    scheme = urlsplit(url).scheme if "//" in url else ""
    if scheme in ("http", "https"):
        return "http"
    if scheme in ("", "grpc", "grpcs"):
        return "grpc"
    raise ValueError(f"--url {url}: the scheme must be http, https, grpc or grpcs, or none for gRPC")


def check_sizes(args: argparse.Namespace) -> None:
    sizes = {name: getattr(args, name) for name in ("num_prompts", "input_len", "output_len", "prefix_len",
                                                    "num_prefixes", "max_concurrency")}
    bad = [f"--{name.replace('_', '-')}" for name, size in sizes.items() if size is not None and size < 1]
    if not args.request_rate > 0:
        bad.append("--request-rate")
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be positive")


def parse_slos(specs: list[str]) -> dict[str, float]:
    """--goodput's NAME:MS pairs; ValueError naming the one that is not."""
    slos = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if name not in SLO_NAMES or not limit > 0:
            raise ValueError(f"--goodput {spec}: give ttft, tpot or e2el and a positive number of ms, e.g. ttft:500")
        slos[name] = limit
    return slos


def make_prompts(args: argparse.Namespace) -> list[Prompt]:
    """The same prompts for every target, seeded: token ids cut from the corpus, and their text for chat."""
    from transformers import AutoTokenizer

    from cluster.bench import workloads
    from cluster.config import cache_dir
    from workers.engine.model_store import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.tokenizer, cache_dir())))
    if args.dataset in ("sharegpt", "jsonl"):
        if not args.dataset_path:
            raise ValueError(f"--dataset {args.dataset} reads --dataset-path: give the file")
        read = sharegpt_prompts if args.dataset == "sharegpt" else jsonl_prompts
        prompts = read(Path(args.dataset_path), lambda text: tokenizer(text, verbose=False).input_ids, args)
        if not prompts:
            raise ValueError(f"{args.dataset_path}: no usable prompt")
        return prompts
    corpus = workloads.corpus_token_ids(lambda text: tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    rng = random.Random(args.seed)
    if args.dataset == "shared-prefix":
        users = math.ceil(args.num_prompts / args.num_prefixes)
        shared = workloads.shared_prefix_workload(corpus, args.num_prefixes, users, args.prefix_len,
                                                  (args.input_len, args.input_len), args.output_len, rng)
        token_lists = [prompt for wave in shared.waves for prompt in wave][:args.num_prompts]
    else:
        low = max(1, round(args.input_len * (1 - args.input_range_ratio)))
        high = max(low, round(args.input_len * (1 + args.input_range_ratio)))
        token_lists = workloads.mixed_workload(corpus, args.num_prompts, low, high, args.output_len, rng).prompts
    return [Prompt(ids, tokenizer.decode(ids), args.output_len) for ids in token_lists]


def sharegpt_prompts(path: Path, encode: Callable[[str], list[int]], args: argparse.Namespace) -> list[Prompt]:
    """Conversations shuffled by --seed; the first human turn is the prompt and the reply's length its output
    length; too short or too long pairs are skipped (vLLM's bounds)."""
    try:
        conversations = [entry["conversations"] for entry in json.loads(path.read_text())
                         if len(entry.get("conversations") or []) >= 2]
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a ShareGPT file (a JSON list of {{\"conversations\": [...]}}): {e}") from None
    random.Random(args.seed).shuffle(conversations)
    prompts = []
    for turns in conversations:
        text, reply = (turn.get("value") if isinstance(turn, dict) else None for turn in turns[:2])
        if not isinstance(text, str) or not isinstance(reply, str):
            continue
        ids, output_tokens = encode(text), len(encode(reply))
        if min(len(ids), output_tokens) < SHAREGPT_MIN_TOKENS or len(ids) > SHAREGPT_MAX_PROMPT or \
                len(ids) + output_tokens > SHAREGPT_MAX_TOTAL:
            continue
        prompts.append(Prompt(ids, text, output_tokens))
        if len(prompts) == args.num_prompts:
            break
    return prompts


def jsonl_prompts(path: Path, encode: Callable[[str], list[int]], args: argparse.Namespace) -> list[Prompt]:
    """The first --num-prompts lines, in order; a line without "output_tokens" generates --output-len."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if len(prompts) == args.num_prompts:
            break
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            text, output_tokens = entry["prompt"], entry.get("output_tokens", args.output_len)
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{path}:{number}: give a JSON object with a \"prompt\"") from None
        if not isinstance(text, str) or not text or isinstance(output_tokens, bool) or \
                not isinstance(output_tokens, int) or output_tokens < 1:
            raise ValueError(f"{path}:{number}: \"prompt\" must be text and \"output_tokens\" a positive integer")
        prompts.append(Prompt(encode(text), text, output_tokens))
    return prompts


def arrival_gaps(count: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait after sending each request: exponential gaps (a Poisson process), or none at rate inf."""
    rng = random.Random(seed)
    return [0.0 if math.isinf(rate) else rng.expovariate(rate) for _ in range(count)]


async def drive(target: HttpTarget | GrpcTarget, prompts: list[Prompt], gaps: list[float], models: list[str],
                sampling: dict, max_concurrency: int | None, progress) -> tuple[list[Outcome], float]:
    """Sends every prompt on its schedule, under its own `model`, and waits for all; returns the outcomes in
    prompt order and the wall time from the first send to the last reply."""
    slots = asyncio.Semaphore(max_concurrency or len(prompts))

    async def one(prompt: Prompt, model: str) -> Outcome:
        async with slots:
            outcome = await target.send(prompt, model, sampling)
        outcome.model = model
        progress.update(1)
        return outcome

    started = time.perf_counter()
    tasks = []
    for prompt, model, gap in zip(prompts, models, gaps):
        tasks.append(asyncio.ensure_future(one(prompt, model)))
        if gap:
            await asyncio.sleep(gap)
    outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - started


def summarize(target: str, outcomes: list[Outcome], duration_s: float, slos_ms: dict[str, float]) -> Summary:
    done = [o for o in outcomes if o.ok]
    return Summary(
        target=target, completed=len(done), failed=len(outcomes) - len(done), duration_s=duration_s,
        prompt_tokens=sum(o.prompt_tokens for o in done), cached_tokens=sum(o.cached_tokens for o in done),
        output_tokens=sum(o.output_tokens for o in done),
        ttft_ms=_stats([o.ttft_s * 1000 for o in done]),
        tpot_ms=_stats([o.tpot_s * 1000 for o in done if o.tpot_s is not None]),
        itl_ms=_stats([gap * 1000 for o in done for gap in o.itl_s]),
        latency_s=_stats([o.latency_s for o in done]),
        server_ttft_ms=_stage_means([o.server_ttft_s for o in done if o.server_ttft_s is not None]),
        good=sum(o.meets(slos_ms) for o in done) if slos_ms else None,
        errors=dict(Counter(o.error for o in outcomes if not o.ok).most_common()), requests=outcomes)


def format_table(summaries: list[Summary]) -> str:
    """A row per figure, a column per target, then each other target's ratio to the first."""
    rows = [("", *(s.target for s in summaries), *(f"{s.target} / first" for s in summaries[1:]))]

    def add(name: str, values: list[float | None], fmt: str) -> None:
        ratios = [f"{v / values[0]:.2f}x" if values[0] and v is not None else "-" for v in values[1:]]
        rows.append((name, *("-" if v is None else format(v, fmt) for v in values), *ratios))

    add("requests completed", [s.completed for s in summaries], "d")
    add("requests failed", [s.failed for s in summaries], "d")
    add("duration, s", [s.duration_s for s in summaries], ".2f")
    add("requests/s", [s.requests_per_s for s in summaries], ".2f")
    if summaries[0].good is not None:
        add("goodput (within every SLO), requests/s", [s.goodput_per_s for s in summaries], ".2f")
    add("output tokens/s", [s.output_tokens_per_s for s in summaries], ".1f")
    add("total tokens/s", [s.total_tokens_per_s for s in summaries], ".1f")
    add("prompt tokens cached, %", [100 * s.cached_tokens / s.prompt_tokens if s.prompt_tokens else None
                                    for s in summaries], ".1f")
    for name, unit, key in (("TTFT", "ms", "ttft_ms"), ("TPOT", "ms", "tpot_ms"), ("ITL", "ms", "itl_ms"),
                            ("latency", "s", "latency_s")):
        for stat in ("mean", "p50", "p90", "p99"):
            add(f"{name} {stat}, {unit}", [getattr(s, key)[stat] for s in summaries], ".3f" if unit == "s" else ".1f")
        if key == "ttft_ms" and any(s.server_ttft_ms for s in summaries):
            for stage in TTFT_STAGES:
                add(f"  server: {stage.replace('_', ' ')} mean, ms",
                    [s.server_ttft_ms[stage] if s.server_ttft_ms else None for s in summaries], ".1f")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for s in summaries:
        for message, count in list(s.errors.items())[:TOP_ERRORS]:
            lines.append(f"{s.target}: {count} failed: {message}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    urls = args.url or ["http://localhost:8000"]
    api_key = args.api_key or os.environ.get("TANDEM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    try:
        check_sizes(args)
        kinds = [target_kind(url) for url in urls]
        slos_ms = parse_slos(args.goodput)
    except ValueError as e:
        print(f"tandem bench serve: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_bench(args, urls, kinds, api_key, slos_ms))


async def _bench(args: argparse.Namespace, urls: list[str], kinds: list[str], api_key: str | None,
                 slos_ms: dict[str, float]) -> int:
    """Every target in turn, on one event loop that owns all their connections."""
    targets = [(HttpTarget if kind == "http" else GrpcTarget)(url, args.api, api_key, args.timeout)
               for url, kind in zip(urls, kinds)]
    try:
        models = []
        for url, target in zip(urls, targets):  # before the prompts are cut: a wrong URL or key fails at once
            try:
                listed = (await target.models())[0]
            except Exception as e:  # refused connection, DNS, TLS, a bad key: this target can't be measured
                print(f"tandem bench serve: cannot list the models of {url}: {type(e).__name__}: {e}",
                      file=sys.stderr)
                return 1
            models.append(args.model or listed)
        try:
            prompts = make_prompts(args)
        except (ValueError, OSError) as e:  # an unreadable dataset file, or more prompts than the corpus holds
            print(f"tandem bench serve: {e}", file=sys.stderr)
            return 2
        log(f"{len(prompts)} prompts ({args.dataset}, {args.tokenizer}'s tokenizer): "
            f"{sum(len(p.token_ids) for p in prompts)} prompt tokens, up to {sum(p.output_tokens for p in prompts)} "
            f"output tokens")
        gaps = arrival_gaps(len(prompts), args.request_rate, args.seed)
        sampling = dict(temperature=args.temperature, ignore_eos=args.ignore_eos)
        summaries = []
        for url, target, model in zip(urls, targets, models):
            salt = dict(cache_salt=uuid.uuid4().hex) if args.isolate_cache else {}
            summary = await _bench_target(target, url, model, args, prompts, gaps, sampling | salt, slos_ms)
            if summary is None:
                return 1
            summaries.append(summary)
    finally:
        for target in targets:
            await target.close()
    print(format_table(summaries))
    _write_json(Path(args.json), args, summaries)
    print(f"\nwrote {args.json}")
    return 0 if all(s.completed for s in summaries) else 1


async def _bench_target(target: "HttpTarget | GrpcTarget", url: str, model: str, args: argparse.Namespace,
                        prompts: list[Prompt], gaps: list[float], sampling: dict,
                        slos_ms: dict[str, float]) -> Summary | None:
    """One target: a request to warm it and check it answers, then the measured run. None, with the reason on
    stderr, when it refuses the warm-up. The warm-up's prompt is shorter than a KV block, so it leaves nothing
    in a prefix cache for the measured requests to hit."""
    from tqdm import tqdm

    first = prompts[0]
    warm = await target.send(Prompt(first.token_ids[-WARM_UP_TOKENS:], first.text[-WARM_UP_TOKENS:], 2), model,
                             sampling)
    if not warm.ok:
        print(f"tandem bench serve: {url} refused the warm-up request: {warm.error}{_hint(warm.error, args)}",
              file=sys.stderr)
        return None
    if args.lora_modules:
        rng = random.Random(args.seed)
        models = [rng.choice(args.lora_modules) for _ in prompts]
        log(f"{url}: {len(prompts)} requests spread over the adapters {', '.join(args.lora_modules)} ({args.api}), "
            f"rate {args.request_rate:g}/s")
    else:
        models = [model] * len(prompts)
        log(f"{url}: {len(prompts)} requests to {model} ({args.api}), rate {args.request_rate:g}/s")
    with tqdm(total=len(prompts), desc=url, unit="req", file=sys.stderr, disable=None) as progress:
        outcomes, duration = await drive(target, prompts, gaps, models, sampling, args.max_concurrency, progress)
    return summarize(url, outcomes, duration, slos_ms)


def _write_json(path: Path, args: argparse.Namespace, summaries: list[Summary]) -> None:
    from cluster.bench.machine import machine_info

    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()
              if k not in ("api_key", "command", "bench", "verbose")}
    path.write_text(json.dumps(dict(config=config, machine=machine_info(),
                                    results=[s.as_dict() for s in summaries]), indent=2) + "\n")


def _hint(error: str, args: argparse.Namespace) -> str:
    """What to change when a server refuses the requests' shape rather than the load."""
    if "ignore_eos" in error or "cache_salt" in error:  # OpenAI's own API knows neither of vLLM's fields
        return " (a server without vLLM's fields: try --no-ignore-eos --no-isolate-cache)"
    if "vocabulary" in error:
        return f" (the prompts were cut with {args.tokenizer}'s tokenizer: give the served model's as --tokenizer)"
    return ""


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict(mean=None, p50=None, p90=None, p99=None)
    return dict(mean=sum(values) / len(values), p50=percentile(values, 50), p90=percentile(values, 90),
                p99=percentile(values, 99))


def _stage_means(reports: list[dict[str, float]]) -> dict[str, float] | None:
    if not reports:
        return None
    return {stage: 1000 * sum(r[stage] for r in reports) / len(reports) for stage in TTFT_STAGES}


def _has_tokens(chunk: dict) -> bool:
    """Whether an OpenAI stream chunk carries generated text: completions' text, chat's content or reasoning."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False


def _message(body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)[:200]


def log(message: str) -> None:
    print(f"tandem bench serve: {message}", file=sys.stderr, flush=True)
