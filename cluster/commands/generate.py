"""`tandem generate`: one prompt, streamed to stdout (or one JSON object with --json).

With --url HOST:PORT the request goes to a running cluster's gRPC API (the Chat RPC with --chat). With
--tensor-parallel-size N or --disaggregate it runs on Ray worker groups started on a local Ray (a prefill group
and a decode group with --disaggregate, the KV moving between them), else in this process.
"""

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from cluster.cli import connect, engine_kwargs, remote_options, sampling_params
from cluster.client import Completion, Stream

LORA_WITH_URL = ("tandem: error: --lora loads an adapter in this process; a cluster serves its adapters (tandem "
                 "serve --lora-modules NAME=PATH, or POST /v1/load_lora_adapter) by name: --model NAME")

if TYPE_CHECKING:
    from workers.engine.llm import LLM
    from workers.engine.outputs import RequestOutput


def run(args: argparse.Namespace) -> int:
    if args.url:
        return _run_remote(args)
    params = sampling_params(args)  # bad sampling flags fail before the model loads
    if args.tensor_parallel_size > 1 or args.disaggregate:
        final = asyncio.run(_run_on_groups(args, params))
    else:
        kwargs = engine_kwargs(args)  # finds the model: one that is not there fails before torch loads
        from workers.engine.llm import LLM  # torch: not for --url, a bad flag or a missing model

        llm = LLM(**kwargs)
        prompt = chat_prompt(llm.tokenizer, args) if args.chat else args.prompt
        final = stream(llm, prompt, params, echo=not args.json)
    if args.json:
        print(json.dumps(to_json(final), ensure_ascii=False))
    return 0


def chat_prompt(tokenizer, args: argparse.Namespace) -> list[int]:
    from workers.engine.llm import chat_token_ids

    return chat_token_ids(tokenizer, chat_messages(args))


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    return messages


def _run_remote(args: argparse.Namespace) -> int:
    if args.tensor_parallel_size > 1 or args.disaggregate:
        print("tandem: error: --url sends the request to a running cluster; --tensor-parallel-size and "
              "--disaggregate are the cluster's settings there (tandem serve)", file=sys.stderr)
        return 2
    if args.lora:
        print(LORA_WITH_URL, file=sys.stderr)
        return 2
    with connect(args) as client:
        options = remote_options(args)
        chunks = client.chat_stream(chat_messages(args), **options) if args.chat \
            else client.stream(args.prompt, **options)
        completion = echo_chunks(chunks, echo=not args.json)
    if args.json:
        print(json.dumps(completion_json(completion), ensure_ascii=False))
    return 0


def echo_chunks(chunks: Stream, echo: bool) -> Completion:
    """A cluster's streamed answer, printing each text delta as it arrives; the thinking a server's reasoning
    parser takes apart from the answer goes to stderr, so stdout holds the answer alone."""
    completion, thinking = Completion(), False
    with chunks:
        for chunk in chunks:
            completion.add(chunk)
            if echo:
                if chunk.reasoning_text:
                    sys.stderr.write(chunk.reasoning_text)
                    sys.stderr.flush()
                    thinking = True
                if chunk.text and thinking:
                    sys.stderr.write("\n")
                    thinking = False
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    if echo:
        sys.stdout.write("\n")
    return completion


def stream(llm: "LLM", prompt, params, echo: bool) -> "RequestOutput":
    """Runs one request on the engine loop, printing each text delta as it is released."""
    engine = llm.engine
    request_id = engine.add_request(prompt, params)
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            _echo(out, echo)
            if out.finished:
                return out


async def _run_on_groups(args: argparse.Namespace, params) -> "RequestOutput":
    import ray
    from transformers import AutoTokenizer

    from workers.disaggregation import generate_disaggregated
    from workers.engine.llm import engine_config
    from workers.group import WorkerGroup

    kwargs = engine_kwargs(args)
    config = engine_config(**kwargs)
    prompt = chat_prompt(AutoTokenizer.from_pretrained(kwargs["model"]), args) if args.chat else args.prompt
    tp, num_groups = args.tensor_parallel_size, 2 if args.disaggregate else 1
    roles = "a prefill group and a decode group" if args.disaggregate else "one worker group"
    print(f"tandem: starting {roles} of tensor parallel size {tp} on a local Ray", file=sys.stderr)
    # One logical CPU per rank: Ray then gives each rank actor one torch thread.
    ray.init(num_cpus=max(tp * num_groups, os.cpu_count() or 1), include_dashboard=False,
             logging_level="WARNING", log_to_driver=args.verbose)
    groups = []
    try:
        # The groups load their models side by side: a group's start mostly waits on its ranks' processes.
        started = await asyncio.gather(*(asyncio.to_thread(WorkerGroup.start, config, tp, progress=True)
                                         for _ in range(num_groups)), return_exceptions=True)
        groups = [g for g in started if not isinstance(g, BaseException)]
        failures = [g for g in started if isinstance(g, BaseException)]
        if failures:
            raise failures[0]
        if args.disaggregate:
            outputs = generate_disaggregated(groups[0], groups[1], prompt, params)
        else:
            outputs = groups[0].generate(prompt, params)
        async for out in outputs:
            _echo(out, not args.json)
            final = out
        return final
    finally:
        for group in groups:
            group.shutdown()
        ray.shutdown()


def _echo(out: "RequestOutput", echo: bool) -> None:
    if not echo:
        return
    sys.stdout.write(out.outputs[0].delta_text + ("\n" if out.finished else ""))
    sys.stdout.flush()


def to_json(out: "RequestOutput") -> dict:
    completion = out.outputs[0]
    return {
        "request_id": out.request_id,
        "text": completion.text,
        "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
        "logprobs": _logprobs_json(completion.logprobs),
        "prompt_logprobs": _logprobs_json(out.prompt_logprobs),
        "usage": vars(out.usage),
        "ttft_s": out.metrics.ttft,
    }


def completion_json(completion: Completion) -> dict:
    """A cluster's completion in to_json's shape (plus the time-to-first-token breakdown)."""
    usage = completion.usage
    ttft = completion.ttft
    return {
        "request_id": completion.request_id,
        "text": completion.text,
        "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
        "logprobs": _logprobs_json(completion.logprobs),
        "prompt_logprobs": _logprobs_json([None, *completion.prompt_logprobs] if completion.prompt_logprobs else None),
        "usage": {"prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
                  "generated_tokens": usage.completion_tokens} if usage else None,
        "ttft_s": ttft.total_s if ttft else None,
        "ttft": asdict(ttft) if ttft else None,
    }


def _logprobs_json(entries: list[dict[int, float] | None] | None) -> list[dict[str, float] | None] | None:
    """JSON keys are strings; a prompt's first token has no logprobs (null)."""
    if not entries:
        return None
    return [None if lp is None else {str(k): v for k, v in lp.items()} for lp in entries]
