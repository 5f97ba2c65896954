"""`tandem`: the command line.

    tandem generate --prompt "Once upon a time"            # stream a completion from the embedded model
    tandem generate --chat --prompt "What is 2+2?" --json  # chat template applied, one JSON object out
    tandem generate --prompt "Hi" -tp 3 --disaggregate     # prefill and decode worker groups of 3 ranks on Ray
    tandem chat                                            # interactive conversation
    tandem generate --url localhost:50051 --prompt "Hi"    # ask a running cluster over gRPC instead
    tandem serve                                           # the cluster: ingress, prefill and decode pools
    tandem convert model.gguf ./model-hf                   # a GGUF file as a Hugging Face folder
    tandem generate --prompt "Hi" --choice yes --choice no # structured output (also --json-schema, --regex)
    tandem generate --prompt "SELECT" --lora ./adapters/sql # through a LoRA adapter (a PEFT folder)
    tandem bench engine                                    # Tandem vs HF transformers, table + JSON
    tandem bench routing                                   # our router vs round-robin, power-of-two, ...
    tandem bench kernels                                   # Triton attention kernels vs torch vs the roofline
    tandem bench chaos                                     # cancel storms and killed ranks: nothing hangs or leaks
    tandem bench soak --minutes 30                         # steady load: memory slopes, KV index, free blocks
    tandem bench serve --request-rate 4                    # a running server's TTFT, TPOT and throughput
    tandem bench lora                                      # LoRA adapters' cost: base vs one vs several mixed
    tandem bench embed                                     # embeddings: Tandem vs HF, documents per second
"""

import argparse
import importlib
import logging
import os
import sys
from importlib.metadata import version as package_version
from pathlib import Path

from cluster.client import TandemClient, TandemError
from cluster.config import ConfigError, cache_dir
from workers.engine.config import ATTENTION_BACKENDS
from workers.engine.errors import InvalidRequestError, LoRAError, ModelNotFoundError


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="'smollm2' (the embedded SmolLM2-135M-Instruct, the default) or the path of a local "
                        "Hugging Face folder with config.json, *.safetensors and tokenizer files; with --url, the "
                        "served model's name (default: the cluster's model)")
    g.add_argument("--lora", metavar="FOLDER", default=None,
                   help="run the requests through this LoRA adapter on top of the model: a PEFT folder "
                        "(adapter_config.json + adapter_model.safetensors); with --url, name one of the cluster's "
                        "adapters with --model instead")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV precision; auto = float32 on CPU, bfloat16 on GPU")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in 16-token blocks")
    g.add_argument("--kv-cache-memory-gb", type=float, default=2.0, help="KV cache size on CPU (default 2 GiB)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="per-step token budget; longer prompts are prefilled in chunks")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    g.add_argument("--kv-offload-gb", type=float, default=0.0, metavar="GIB",
                   help="host memory that keeps prefix-cache blocks the KV cache evicts, to copy back instead of "
                        "recomputing them (default 0: off)")
    g.add_argument("--attention-backend", default="torch", choices=ATTENTION_BACKENDS,
                   help="attention kernels: torch (CPU and GPU, the default) or triton (GPU)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every decode step eagerly instead of replaying CUDA graphs (graphs are used on cuda "
                        "with the triton backend)")
    g.add_argument("--num-speculative-tokens", type=int, default=0, metavar="K",
                   help="speculative decoding by n-gram lookup: guess K tokens per step from the text's own earlier "
                        "tokens, kept where the model agrees (default 0: off)")


def _remote_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote cluster (instead of loading the model here)")
    g.add_argument("--url", metavar="HOST:PORT", default=None,
                   help="send the request to a running Tandem cluster's gRPC API at HOST:PORT (e.g. "
                        "localhost:50051, where `tandem serve` listens by default) instead of loading the model in "
                        "this process; the engine flags other than --model are then unused")
    g.add_argument("--api-key", default=None,
                   help="API key for the cluster, sent as 'authorization: Bearer <key>' (default: $TANDEM_API_KEY)")
    g.add_argument("--tls-ca", metavar="FILE", default=None,
                   help="PEM CA certificate to verify the cluster's TLS certificate with (turns TLS on)")
    g.add_argument("--tls", action="store_true", help="use TLS, verified with the system's root certificates")
    g.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline of each request to the cluster (default: none)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than MIN_P x the likeliest (default 0 = off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="generate at least this many tokens before end-of-sequence or a stop ends it (default 0)")
    g.add_argument("--logprobs", type=int, default=None, help="return the top-N logprobs of each token")
    g.add_argument("--prompt-logprobs", type=int, default=None,
                   help="return the top-N logprobs of each prompt token too (--json; computes the whole prompt)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (default 1 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted once from each generated token's logit (OpenAI's; default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per occurrence from each generated token's logit (OpenAI's; default 0)")
    g.add_argument("--bad-word", dest="bad_words", action="append", default=[],
                   help="a word never to generate (repeatable)")
    g.add_argument("--allowed-token-id", dest="allowed_token_ids", type=int, action="append", default=[],
                   help="generate only these token ids (repeatable; default: any)")
    g.add_argument("--truncate-prompt-tokens", type=int, default=None, metavar="K",
                   help="keep only the prompt's last K tokens (-1: as many as the context allows) rather than "
                        "refuse a prompt too long for it")
    g = p.add_argument_group("structured output (at most one; the output then ends where the structure does)")
    kinds = g.add_mutually_exclusive_group()
    kinds.add_argument("--json-schema", metavar="SCHEMA", type=_text_or_file, default=None,
                       help="a JSON schema the output validates against: its JSON text, or a file holding it")
    kinds.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    kinds.add_argument("--regex", default=None, help="a regular expression the whole output matches")
    kinds.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    kinds.add_argument("--grammar", metavar="EBNF", type=_text_or_file, default=None,
                       help="an EBNF grammar (xgrammar's GBNF) whose rule `root` is the output: its text, or a "
                            "file holding it")


def _text_or_file(value: str) -> str:
    return Path(value).read_text() if os.path.isfile(value) else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: an LLM serving engine and cluster.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    parser.add_argument("--version", action="version", version=f"tandem {package_version('tandem')}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt and stream it to stdout",
                         description="Generate text for one prompt, streaming tokens as they are produced: in this "
                                     "process, or with --url on a running cluster.")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, token ids, finish reason, usage, ttft) instead of a stream")
    _remote_args(gen)
    _engine_args(gen)
    g = gen.add_argument_group("parallelism (these start a local Ray and run the engine in worker groups)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks per worker group, each holding a slice of every layer (default 1); the model's "
                        "attention heads must divide by it")
    g.add_argument("--disaggregate", action="store_true",
                   help="run a prefill group and a decode group and move the prompt's KV cache between them")
    _sampling_args(gen)

    chat = sub.add_parser("chat", help="talk to the model interactively (one line a turn; Ctrl-D ends)",
                          description="An interactive conversation, in this process or with --url on a running "
                                      "cluster; the whole history is re-sent each turn, so the prefix cache makes "
                                      "later turns start fast.")
    chat.add_argument("--system", default=None, help="system message")
    _remote_args(chat)
    _engine_args(chat)
    _sampling_args(chat)

    serve_parser = sub.add_parser(
        "serve", help="start the cluster: a local Ray, Redis, and prefill/decode pools behind an ingress",
        description="Starts a local Ray, a local redis-server (unless --redis-url), and the Serve application: "
                    "an ingress in front of a prefill pool and a decode pool of worker groups. Every setting is a "
                    "flag or a key of the --config YAML file (deploy/tandem.yaml documents them); flags win.")
    from cluster.config import add_arguments as add_cluster_arguments

    add_cluster_arguments(serve_parser)
    serve_parser.add_argument("--log-stats-interval", type=float, default=10.0, metavar="S",
                              help="seconds between the console's throughput and load lines while the cluster "
                                   "works (0: none, as vLLM's --disable-log-stats; default: %(default)s)")

    from cluster.commands import config as config_command

    config_command.add_arguments(sub.add_parser("config", help=config_command.HELP))

    from cluster.commands import convert

    convert.add_arguments(sub.add_parser("convert", help=convert.HELP))

    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    benches = _bench_modules()

    for name, (help_text, description) in _BENCHES.items():
        benches[name].add_arguments(bench_sub.add_parser(name, help=help_text, description=description))
    return parser


# `tandem bench`'s commands, in the order --help lists them: (help, description or None), each the module
# cluster/bench/<name>.py.
_BENCHES = {
    "engine": ("Tandem vs HF transformers on the same workloads",
               "Throughput and TTFT of Tandem's engine against HF transformers (sequential and padded batch) in one "
               "run."),
    "transfer": ("KV transfer bandwidth and added latency",
                 "Moves a prompt's KV blocks between two processes over a real KV channel, by prompt length."),
    "routing": ("prefix-cache-aware routing vs round-robin, power-of-two, prefix tree, SGLang",
                "Runs the same multi-turn, multi-tenant workload (and a no-reuse control) through the cluster once "
                "per prefill router and compares hit rate, TTFT, throughput and load spread."),
    "kernels": ("decode attention step time: Triton kernels vs the torch backend vs the roofline",
                "Times one layer's decode attention and KV write at several batch sizes and context lengths for "
                "Llama-3.1-8B's attention shape on CUDA (a tiny shape under Triton's interpreter without)."),
    "chaos": ("cancel storms and killed ranks through the gRPC API: exact tokens, no hang, no leak",
              "Rounds of concurrent streams cancelled at every phase, then SIGKILL of a decode rank and a prefill "
              "rank under load; exits 1 if any promise is broken."),
    "embed": ("embeddings: Tandem vs HF transformers (one at a time, length-sorted batches), documents/s", None),
    "structured": ("structured output's cost: free text vs a JSON schema, output tokens per second", None),
    "speculative": ("speculative decoding by n-gram lookup vs one token per step: tok/s, acceptance", None),
    "lora": ("LoRA adapters' cost: base model vs one adapter vs several mixed in a batch, tok/s", None),
    "serve": ("a running server under load through its HTTP or gRPC API: TTFT, TPOT, ITL, throughput",
              "Sends the same seeded prompts to each --url at a set request rate, streamed, as vLLM's `vllm bench "
              "serve` does, and compares the targets side by side."),
    "soak": ("steady shared-prefix load for N minutes: memory slope per process, KV index, free blocks",
             "Samples every cluster process's memory, each pool's free KV blocks and the router's KV index size "
             "every 15 s under a closed loop of clients."),
}


def _bench_modules() -> dict:
    """`tandem bench`'s commands by name: each module's add_arguments and run. Imported when a bench is built or run,
    so the other commands start without them."""
    return {name: importlib.import_module(f"cluster.bench.{name}") for name in _BENCHES}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            from cluster.commands import generate

            return generate.run(args)
        if args.command == "chat":
            from cluster.commands import chat

            return chat.run(args)
        if args.command == "config":
            from cluster.commands import config as config_command

            return config_command.run(args)
        if args.command == "serve":
            from cluster.commands import serve

            return serve.run(args)
        if args.command == "convert":
            from cluster.commands import convert

            return convert.run(args)
        return _bench_modules()[args.bench].run(args)
    except (ModelNotFoundError, InvalidRequestError, LoRAError, ConfigError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except TandemError as e:  # the cluster refused or failed the request (--url)
        print(f"tandem: {e.code.name}: {e.details}", file=sys.stderr)
        return 1


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the shared engine flags; a model or adapter that is not there fails here,
    before torch loads."""
    from workers.engine.lora_folder import read_folder
    from workers.engine.model_store import resolve_model

    if args.lora:
        read_folder(adapter_name(args), args.lora)

    return dict(model=str(resolve_model(args.model or "smollm2", cache_dir())), device=args.device, dtype=args.dtype,
                max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
                kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching, kv_offload_gb=args.kv_offload_gb,
                attention_backend=args.attention_backend,
                enforce_eager=args.enforce_eager, num_speculative_tokens=args.num_speculative_tokens,
                lora_modules={adapter_name(args): args.lora} if args.lora else None)


def adapter_name(args: argparse.Namespace) -> str | None:
    """--lora's adapter goes by its folder's name in the engine's table and its messages."""
    return Path(args.lora).resolve().name if args.lora else None


def sampling_params(args: argparse.Namespace):
    from workers.engine.sampling_params import SamplingParams

    return SamplingParams(**_sampling_fields(args), lora=adapter_name(args))


def connect(args: argparse.Namespace) -> TandemClient:
    """A client for the cluster at --url, with the API key and TLS flags."""
    if args.tls_ca is not None and not os.path.isfile(args.tls_ca):
        raise ConfigError(f"--tls-ca: no such file {args.tls_ca!r}")
    return TandemClient(args.url, api_key=args.api_key or os.environ.get("TANDEM_API_KEY"), tls=args.tls,
                        root_certificates=args.tls_ca, timeout=args.timeout)


def remote_options(args: argparse.Namespace) -> dict:
    """The sampling flags as request options for the cluster, which validates them (INVALID_ARGUMENT)."""
    return dict(**_sampling_fields(args), model=args.model)


def _sampling_fields(args: argparse.Namespace) -> dict:
    """The sampling flags by SamplingParams' names, which the client's options share."""
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                min_tokens=args.min_tokens, logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, structured_output=_structured_output(args),
                bad_words=tuple(args.bad_words), allowed_token_ids=tuple(args.allowed_token_ids),
                truncate_prompt_tokens=args.truncate_prompt_tokens)


def _structured_output(args: argparse.Namespace) -> dict | None:
    """The structured-output flag given, as a dict of StructuredOutput's fields (which the client takes too)."""
    given = dict(json=args.json_schema, json_object=args.json_object, regex=args.regex, choice=args.choice,
                 grammar=args.grammar)
    return next(({kind: value} for kind, value in given.items() if value), None)


if __name__ == "__main__":
    sys.exit(main())
