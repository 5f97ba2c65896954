"""`tandem bench structured`: what a structured output costs, free text against a JSON schema in one run.

The same chat prompts (asking for a person as JSON) run twice on one engine, as one batch each: free, then held
to a JSON schema. Both end at EOS or max_tokens, so their token counts differ; the table compares output tokens
per second, the figure the grammar's per-step mask work lowers, and counts the replies that parse and validate.

    tandem bench structured                      # 16 requests of up to 128 tokens on the embedded model
    tandem bench structured --quick              # seconds: a smoke test
"""

import argparse
import json
import sys
import time
from pathlib import Path

from cluster.bench import sizes
from cluster.bench.machine import machine_info

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "skills"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                         "city": {"type": "string", "maxLength": 40},
                         "skills": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4}}}
_JOBS = ["teacher", "nurse", "pilot", "chef", "farmer", "painter", "lawyer", "plumber"]
_FULL, _QUICK = dict(requests=16, max_tokens=128), dict(requests=2, max_tokens=96)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the default), an HF folder or a .gguf file")
    sizes.add_arguments(parser, "structured", _FULL, _QUICK)


def run(args: argparse.Namespace) -> int:
    from cluster.config import cache_dir
    from workers.engine.llm import LLM
    from workers.engine.model_store import resolve_model
    from workers.engine.sampling_params import SamplingParams, StructuredOutput

    requests, max_tokens = sizes.sizes(args, _FULL, _QUICK)
    llm = LLM(str(resolve_model(args.model, cache_dir())), progress=False)
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Describe a {_JOBS[i % len(_JOBS)]} number "
                                                                    f"{i} as JSON."}]) for i in range(requests)]
    runs = {}
    for name, structure in (("free", None), ("json-schema", StructuredOutput(json=PERSON))):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=structure)
        llm.generate(prompts[:1], params)  # warm: the first structured request also compiles the grammar
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
        tokens = sum(len(out.outputs[0].token_ids) for out in outs)
        runs[name] = dict(requests=requests, output_tokens=tokens, wall_s=wall, output_tokens_per_s=tokens / wall,
                          valid=sum(_valid(out.outputs[0].text) for out in outs))
    ratio = runs["json-schema"]["output_tokens_per_s"] / runs["free"]["output_tokens_per_s"]
    print(f"{'run':<12} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'valid JSON':>10}")
    for name, r in runs.items():
        print(f"{name:<12} {r['requests']:>8} {r['output_tokens']:>7} {r['wall_s']:>7.2f} "
              f"{r['output_tokens_per_s']:>8.1f} {r['valid']:>10}")
    print(f"json-schema / free output tokens per second: {ratio:.2f}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(config=dict(model=args.model, requests=requests, max_tokens=max_tokens,
                                                schema=PERSON), machine=machine_info(), results=runs,
                                    tokens_per_s_ratio=ratio), indent=2) + "\n")
    return 0


def _valid(text: str) -> bool:
    """Parses and has the schema's keys (the grammar guarantees the rest, unless max_tokens cut it short)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and value.keys() == PERSON["properties"].keys()


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m cluster.bench.structured")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
