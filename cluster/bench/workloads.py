"""Seeded benchmark prompts cut from real English text.

Random token ids would make greedy decoding sit on near-ties, where float rounding flips tokens and the match-rate
column would measure noise rather than correctness. The standard library's docstrings are real prose that ships
with every Python, so the prompts need no download and are identical on every machine with the same Python.
"""

import importlib
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass

Tokens = list[int]

_CORPUS_MODULES = (
    "argparse", "calendar", "collections", "csv", "dataclasses", "decimal", "difflib", "doctest", "fractions",
    "functools", "heapq", "inspect", "json", "logging", "optparse", "pathlib", "pdb", "pickle", "random", "re",
    "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
    "zipfile",
)


def corpus_token_ids(encode: Callable[[str], Tokens]) -> Tokens:
    """Every corpus module's docstring and those of its own public members, in a fixed order, as one token list."""
    texts = []
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr, member in sorted(vars(module).items()):
            if not attr.startswith("_") and getattr(member, "__module__", None) == name:
                texts.append(inspect.getdoc(member) or "")
    return encode("\n\n".join(t for t in texts if t))


@dataclass(frozen=True)
class MixedWorkload:
    """Independent prompts of varied length, all arriving together; every request generates `output_tokens`."""

    prompts: list[Tokens]
    output_tokens: int


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """`waves[w][p]` is user w of system prompt p: a long shared prefix followed by that user's own message.

    Wave 0 brings the first user of every system prompt, so nothing is cached yet; each later wave brings one more
    user per system prompt, whose prefix a prefix cache has already seen.
    """

    prefixes: list[Tokens]
    waves: list[list[Tokens]]
    output_tokens: int


def mixed_workload(corpus: Tokens, num_requests: int, min_prompt: int, max_prompt: int, output_tokens: int,
                   rng: random.Random) -> MixedWorkload:
    """Each prompt starts at a different corpus offset, so no two share a leading KV block and a prefix cache
    gets nothing for free on a workload meant to measure batching alone."""
    starts = rng.sample(range(_room(corpus, max_prompt, num_requests)), num_requests)
    prompts = [corpus[s:s + rng.randint(min_prompt, max_prompt)] for s in starts]
    return MixedWorkload(prompts, output_tokens)


def shared_prefix_workload(corpus: Tokens, num_prefixes: int, users_per_prefix: int, prefix_tokens: int,
                           user_tokens: tuple[int, int], output_tokens: int,
                           rng: random.Random) -> SharedPrefixWorkload:
    """System prompts come from disjoint stretches of the corpus, so the only reuse is the one being measured."""
    stretch = len(corpus) // num_prefixes
    if stretch < prefix_tokens:
        raise ValueError(f"the text corpus has {len(corpus)} tokens, too few for {num_prefixes} disjoint system "
                         f"prompts of {prefix_tokens} tokens")
    prefixes = [corpus[p * stretch + o:p * stretch + o + prefix_tokens]
                for p, o in enumerate(rng.randrange(stretch - prefix_tokens + 1) for _ in range(num_prefixes))]
    waves = []
    for _ in range(users_per_prefix):
        lengths = [rng.randint(*user_tokens) for _ in prefixes]
        starts = [rng.randrange(_room(corpus, n, 1)) for n in lengths]
        waves.append([prefix + corpus[s:s + n] for prefix, s, n in zip(prefixes, starts, lengths)])
    return SharedPrefixWorkload(prefixes, waves, output_tokens)


def _room(corpus: Tokens, length: int, count: int) -> int:
    """How many start offsets leave a full `length`-token window, checked against the `count` needed."""
    room = len(corpus) - length + 1
    if room < count:
        raise ValueError(f"the text corpus has {len(corpus)} tokens, too few for {count} distinct "
                         f"{length}-token prompts")
    return room
