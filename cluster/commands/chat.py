"""`tandem chat`: an interactive conversation on the engine, one line a turn."""

import argparse
import sys

from cluster.cli import engine_kwargs, sampling_params
from cluster.commands.generate import stream
from workers.engine.llm import LLM


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
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
        out = stream(llm, llm.apply_chat_template(messages), params, echo=True)
        messages.append({"role": "assistant", "content": out.outputs[0].text})
