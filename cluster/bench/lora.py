"""`tandem bench lora`: what serving LoRA adapters costs, base model against adapters, in one run.

One engine loads `--adapters` adapters of rank `--rank` on every projection (random weights in PEFT's format, or
your own with --lora-modules) and runs the same chat requests as one batch three times: all on the base model,
all on one adapter, and spread round-robin over the base model and every adapter (the multi-tenant case, where
each step holds rows of several adapters). Each run has a cache salt of its own, so each computes its prompts.
The table gives output tokens per second and the ratio to the base model's; and, for the mixed run, whether each
request's tokens equal those it got in the run of its own adapter alone (a batch's other adapters must not change
a reply). Last, the time to the first token of a request whose adapter the engine loads on its way (as a cluster's
groups load an adapter loaded while the cluster runs), against the same request once it is loaded.

    tandem bench lora                    # 32 requests of up to 64 tokens, 4 adapters of rank 16
    tandem bench lora --quick            # seconds: a smoke test
"""

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cluster.bench import sizes
from cluster.bench.machine import machine_info

_TOPICS = ["a lighthouse keeper", "the tides", "a chess opening", "bread dough rising", "a comet", "river otters",
           "the printing press", "a violin's strings"]
_FULL, _QUICK = dict(requests=32, max_tokens=64), dict(requests=4, max_tokens=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the default), an HF folder or a .gguf file")
    parser.add_argument("--adapters", type=int, default=4, help="random adapters to load (default 4)")
    parser.add_argument("--rank", type=int, default=16, help="their rank (default 16)")
    parser.add_argument("--lora-modules", default=None, metavar="NAME=PATH,...",
                        help="your own adapters (PEFT folders) instead of random ones")
    sizes.add_arguments(parser, "lora", _FULL, _QUICK)


def write_random_adapter(folder: Path, model_dir: Path, *, rank: int, alpha: float, seed: int,
                         targets: tuple[str, ...] | None = None, layers: range | None = None,
                         use_rslora: bool = False, std: float = 0.04) -> Path:
    """A LoRA adapter for the model in PEFT's format, with random A and B (PEFT starts B at zero, which would
    change nothing) on `targets` (every projection adapters may change by default) in `layers` (every layer by
    default)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from workers.engine.lora import PROJECTIONS

    targets = targets or tuple(PROJECTIONS)
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            shapes.update({key: f.get_slice(key).get_shape() for key in f.keys()})
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in layers if layers is not None else range(num_layers):
        for target in targets:
            block = PROJECTIONS[target][0].split(".")[0]  # self_attn or mlp
            module = f"model.layers.{i}.{block}.{target}"
            out_features, in_features = shapes[f"{module}.weight"]
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features,
                                                                             generator=generator) * std
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank,
                                                                             generator=generator) * std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "r": rank,
         "lora_alpha": alpha, "target_modules": list(targets), "use_rslora": use_rslora, "bias": "none",
         "fan_in_fan_out": False, "lora_dropout": 0.0, "modules_to_save": None}))
    return folder


def run(args: argparse.Namespace) -> int:
    from cluster.config import cache_dir, named_paths
    from workers.engine.model_store import resolve_model

    requests, max_tokens = sizes.sizes(args, _FULL, _QUICK)
    if not args.lora_modules and (args.adapters < 1 or args.rank < 1):
        print(f"tandem bench lora: --adapters and --rank must be at least 1 (got {args.adapters} and {args.rank})",
              file=sys.stderr)
        return 2
    model_dir = resolve_model(args.model, cache_dir())
    with tempfile.TemporaryDirectory() as scratch:
        if args.lora_modules:
            modules = named_paths(args.lora_modules)
            if not isinstance(modules, dict):
                print(f"tandem bench lora: --lora-modules takes NAME=PATH pairs, got {modules!r}", file=sys.stderr)
                return 2
        else:
            modules = {f"random-{i}": str(write_random_adapter(Path(scratch) / str(i), model_dir, rank=args.rank,
                                                               alpha=args.rank, seed=i))
                       for i in range(args.adapters)}
        return _bench(args, model_dir, modules, requests, max_tokens)


def _bench(args: argparse.Namespace, model_dir: Path, modules: dict[str, str], requests: int, max_tokens: int) -> int:
    from workers.engine.llm import LLM
    from workers.engine.sampling_params import SamplingParams

    llm = LLM(str(model_dir), progress=False, num_kv_blocks=4096, max_num_seqs=max(requests, 1), lora_modules=modules)
    names = list(modules)
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Tell me about {_TOPICS[i % len(_TOPICS)]}."}])
               for i in range(requests)]
    runs = {"base model": [None] * requests, "one adapter": [names[0]] * requests,
            f"base + {len(names)} adapters mixed": [([None] + names)[i % (len(names) + 1)] for i in range(requests)]}
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, lora=names[0]))  # warm
    rows, replies = [], {}
    for name, adapters in runs.items():
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, lora=a) for a in adapters]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, cache_salt=uuid.uuid4().hex)
        wall = time.perf_counter() - start
        replies[name] = [out.outputs[0].token_ids for out in outs]
        tokens = sum(len(r) for r in replies[name])
        rows.append(dict(run=name, requests=requests, adapters=len(set(adapters) - {None}), output_tokens=tokens,
                         wall_s=wall, output_tokens_per_s=tokens / wall))
    rows[-1]["same_tokens"] = _mixed_replies_match(replies, runs, names)
    _print(rows)
    load = _first_use(llm, prompts[0], modules[names[0]])
    print(f"a request naming an adapter not loaded yet (lora_path): {load['first_ms']:.0f} ms to its first token, "
          f"{load['loaded_ms']:.0f} ms once loaded: loading costs {load['first_ms'] - load['loaded_ms']:.0f} ms")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(config=dict(model=args.model, requests=requests, max_tokens=max_tokens,
                                                adapters=names, rank=None if args.lora_modules else args.rank),
                                    machine=machine_info(), results=rows, load_on_first_use=load), indent=2) + "\n")
    return 0 if rows[-1]["same_tokens"] else 1


def _first_use(llm, prompt: list[int], folder: str) -> dict[str, float]:
    """The time to the first token of a request that brings an adapter's folder (a cluster's adapter loaded while
    it runs), when the engine has not loaded it and then once it has; each prompt computed whole (a fresh salt)."""
    from workers.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, lora=f"loaded-later@{uuid.uuid4().hex}", lora_path=folder)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        llm.generate(prompt, params, cache_salt=uuid.uuid4().hex)
        times.append((time.perf_counter() - start) * 1000)
    return dict(first_ms=times[0], loaded_ms=times[1])


def _mixed_replies_match(replies: dict[str, list[list[int]]], runs: dict[str, list[str | None]],
                         names: list[str]) -> bool | None:
    """Whether each mixed request's tokens equal its own adapter's run alone (where that run exists: the base
    model's and the first adapter's); None when the mixed run holds neither."""
    base, one, mixed = runs
    alone = {None: replies[base], names[0]: replies[one]}
    pairs = [(got, alone[adapter][i]) for i, (got, adapter) in enumerate(zip(replies[mixed], runs[mixed]))
             if adapter in alone]
    return all(got == expected for got, expected in pairs) if pairs else None


def _print(rows: list[dict]) -> None:
    print(f"{'run':<28} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'vs base':>8} {'same':>5}")
    for r in rows:
        same = "" if r.get("same_tokens") is None else ("yes" if r["same_tokens"] else "NO")
        print(f"{r['run']:<28} {r['requests']:>8} {r['output_tokens']:>7} {r['wall_s']:>7.2f} "
              f"{r['output_tokens_per_s']:>7.1f} {r['output_tokens_per_s'] / rows[0]['output_tokens_per_s']:>7.2f}x "
              f"{same:>5}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m cluster.bench.lora")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
