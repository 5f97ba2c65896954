"""`tandem generate`: one prompt, streamed to stdout (or one JSON object with --json)."""

import argparse
import json
import sys

from cluster.cli import engine_kwargs, sampling_params
from workers.engine.llm import LLM
from workers.engine.outputs import RequestOutput


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad sampling flags fail before the model loads
    llm = LLM(**engine_kwargs(args))
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = llm.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    final = stream(llm, prompt, params, echo=not args.json)
    if args.json:
        print(json.dumps(to_json(final), ensure_ascii=False))
    return 0


def stream(llm: LLM, prompt, params, echo: bool) -> RequestOutput:
    """Runs one request on the engine loop, printing each text delta as it is released."""
    engine = llm.engine
    request_id = engine.add_request(prompt, params)
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if echo:
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
            if out.finished:
                if echo:
                    sys.stdout.write("\n")
                return out


def to_json(out: RequestOutput) -> dict:
    completion = out.outputs[0]
    return {
        "request_id": out.request_id,
        "text": completion.text,
        "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
        "logprobs": [{str(k): v for k, v in lp.items()} for lp in completion.logprobs] if completion.logprobs else None,
        "usage": vars(out.usage),
        "ttft_s": out.metrics.ttft,
    }
