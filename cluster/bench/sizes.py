"""The flags of the small single-engine benchmarks: how many requests, how long each reply, --quick, the JSON."""

import argparse


def add_arguments(parser: argparse.ArgumentParser, name: str, full: dict[str, int], quick: dict[str, int]) -> None:
    """--requests, --max-tokens (defaulting to `full`, or `quick` with --quick), --quick and --json."""
    parser.add_argument("--requests", type=int, default=None,
                        help=f"prompts per run (default {full['requests']}; {quick['requests']} with --quick)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"most tokens per reply (default {full['max_tokens']}; {quick['max_tokens']} with "
                             "--quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that runs in seconds")
    parser.add_argument("--json", default=f"bench-results/{name}.json", help="where to write every number")


def sizes(args: argparse.Namespace, full: dict[str, int], quick: dict[str, int]) -> tuple[int, int]:
    """(requests, max_tokens) as the flags ask."""
    defaults = quick if args.quick else full
    return args.requests or defaults["requests"], args.max_tokens or defaults["max_tokens"]
