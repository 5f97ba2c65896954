"""`tandem bench speculative`: speculative decoding by n-gram lookup against one token per step, in one run.

Greedy chat requests in two workloads: "quoting" asks for answers that repeat their prompt (copy a list, add type
hints to a function), where n-gram guesses are mostly right; "open" asks for new text (a story, an explanation),
where few are. "quoting-t0.7" samples the quoting requests at temperature 0.7 (seeded), where a guess is kept when
the request's own draw equals it. Each runs one request at a time (the latency case, where a step is one token's
worth of work) and as one batch, on two engines with the same weights: guessing off, and
`--num-speculative-tokens` per step. The table gives output tokens per second, the steps taken, the share of
guesses kept and whether every reply's tokens equal the one-token-per-step engine's.

    tandem bench speculative                     # 8 requests per workload, up to 128 tokens each
    tandem bench speculative --quick             # seconds: a smoke test
"""

import argparse
import json
import sys
import time
from pathlib import Path

from cluster.bench import sizes
from cluster.bench.machine import machine_info

_FUNCTION = '''def mean_and_spread(values, weights=None):
    if weights is None:
        weights = [1.0] * len(values)
    total = sum(weights)
    mean = sum(v * w for v, w in zip(values, weights)) / total
    spread = sum(w * (v - mean) ** 2 for v, w in zip(values, weights)) / total
    return mean, spread ** 0.5
'''
_ANIMALS = ["fox", "cat", "owl", "bear", "wolf", "hare", "deer", "lynx"]
QUOTING = ["Repeat this list exactly, line by line:\n" + "".join(
    f"- {i + 1}. the {animal} number {i * 7 + n} crosses the river at dawn\n" for i in range(6))
    if n % 2 == 0 else f"Add type hints to this function and return the whole function:\n\n{_FUNCTION}"
    for n, animal in enumerate(_ANIMALS)]
OPEN = [f"Write a short story about a {animal} who learns to sail." if n % 2 == 0 else
        f"Explain in a few sentences how a {animal} survives the winter." for n, animal in enumerate(_ANIMALS)]
_FULL, _QUICK = dict(requests=8, max_tokens=128), dict(requests=2, max_tokens=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the default), an HF folder or a .gguf file")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="tokens guessed per step (default 4)")
    sizes.add_arguments(parser, "speculative", _FULL, _QUICK)


def run(args: argparse.Namespace) -> int:
    from cluster.config import cache_dir
    from workers.engine.llm import LLM
    from workers.engine.model_store import resolve_model
    from workers.engine.sampling_params import SamplingParams

    requests, max_tokens = sizes.sizes(args, _FULL, _QUICK)
    model = str(resolve_model(args.model, cache_dir()))
    engines = {"one-per-step": LLM(model, progress=False, num_kv_blocks=1024),
               "speculative": LLM(model, progress=False, num_kv_blocks=1024,
                                  num_speculative_tokens=args.num_speculative_tokens)}
    chat = engines["one-per-step"].apply_chat_template
    workloads = {name: ([chat([{"role": "user", "content": text}]) for text in (texts * requests)[:requests]],
                        [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i if temperature else None)
                         for i in range(requests)])
                 for name, texts, temperature in (("quoting", QUOTING, 0.0), ("open", OPEN, 0.0),
                                                  ("quoting-t0.7", QUOTING, 0.7))}
    for llm in engines.values():
        llm.generate(workloads["open"][0][:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm
    rows = []
    for workload, (prompts, params) in workloads.items():
        for mode in ("one at a time", "batch"):
            replies = {}
            for system, llm in engines.items():
                engine = llm.engine
                before = (engine.num_steps, engine.num_guessed_tokens, engine.num_accepted_guesses)
                start = time.perf_counter()
                outs = [llm.generate(p, q)[0] for p, q in zip(prompts, params)] if mode == "one at a time" \
                    else llm.generate(prompts, params)
                wall = time.perf_counter() - start
                replies[system] = [out.outputs[0].token_ids for out in outs]
                tokens = sum(len(r) for r in replies[system])
                guessed = engine.num_guessed_tokens - before[1]
                rows.append(dict(workload=workload, mode=mode, system=system, requests=len(prompts),
                                 output_tokens=tokens, wall_s=wall, output_tokens_per_s=tokens / wall,
                                 steps=engine.num_steps - before[0], guessed_tokens=guessed,
                                 accepted_guesses=engine.num_accepted_guesses - before[2]))
            # Greedy or seeded, a reply's tokens are the same whether guessed or not.
            rows[-1]["same_tokens"] = replies["speculative"] == replies["one-per-step"]
    _print(rows)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(config=dict(model=args.model, requests=requests, max_tokens=max_tokens,
                                                num_speculative_tokens=args.num_speculative_tokens),
                                    machine=machine_info(), results=rows), indent=2) + "\n")
    return 0 if all(r.get("same_tokens", True) for r in rows) else 1


def _print(rows: list[dict]) -> None:
    print(f"{'workload':<12} {'mode':<14} {'system':<13} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'steps':>6} "
          f"{'accepted':>8} {'same':>5}")
    for r in rows:
        accepted = f"{r['accepted_guesses'] / r['guessed_tokens']:.0%}" if r["guessed_tokens"] else "-"
        same = "" if "same_tokens" not in r else ("yes" if r["same_tokens"] else "NO")
        print(f"{r['workload']:<12} {r['mode']:<14} {r['system']:<13} {r['output_tokens']:>6} {r['wall_s']:>7.2f} "
              f"{r['output_tokens_per_s']:>7.1f} {r['steps']:>6} {accepted:>8} {same:>5}")
    for base, spec in zip(rows[::2], rows[1::2]):
        print(f"{base['workload']}, {base['mode']}: speculative / one-per-step output tok/s "
              f"{spec['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m cluster.bench.speculative")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
