"""`tandem chat`: an interactive conversation, one line a turn: on the engine in this process, or with
--url HOST:PORT on a running cluster (the Chat RPC each turn, the whole conversation re-sent)."""

import argparse
import sys
from collections.abc import Callable

from cluster.cli import connect, engine_kwargs, remote_options, sampling_params
from cluster.commands.generate import LORA_WITH_URL, echo_chunks, stream

Reply = Callable[[list[dict[str, str]]], str]  # streams the reply to the conversation so far, returns its text


def run(args: argparse.Namespace) -> int:
    if args.url and args.lora:
        print(LORA_WITH_URL, file=sys.stderr)
        return 2
    if args.url:
        with connect(args) as client:
            options = remote_options(args)
            return converse(args, lambda messages: echo_chunks(client.chat_stream(messages, **options), True).text)
    params = sampling_params(args)
    kwargs = engine_kwargs(args)  # finds the model: one that is not there fails before torch loads
    from workers.engine.llm import LLM  # torch: not for --url, a bad flag or a missing model

    llm = LLM(**kwargs)
    return converse(args, lambda messages: stream(llm, llm.apply_chat_template(messages), params,
                                                  echo=True).outputs[0].text)


def converse(args: argparse.Namespace, reply: Reply) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        messages.append({"role": "assistant", "content": reply(messages)})
