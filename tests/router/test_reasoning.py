"""Telling a reasoning model's thinking from its answer, whole and while the reply streams, whichever side of the
prompt opens the <think> block."""

import pytest
from transformers import AutoTokenizer

from router.reasoning import Parts, ReasoningParser, ReasoningSplit


@pytest.mark.parametrize(("opened", "text", "parts"), [
    (False, "<think>Two plus two.</think>Four.", Parts("Two plus two.", "Four.", True)),
    (False, "\n<think>Hmm.</think>\n\nFour.", Parts("Hmm.", "\n\nFour.", True)),
    (True, "Two plus two.</think>Four.", Parts("Two plus two.", "Four.", True)),
    (True, "<think>Two plus two.</think>Four.", Parts("Two plus two.", "Four.", True)),
    (True, "Two plus two is", Parts("Two plus two is", "", True)),  # cut off while thinking: all thinking
    (False, "Four.", Parts(None, "Four.", True)),  # no block: all answer
    (False, "Four.</think>", Parts(None, "Four.</think>", True)),  # an end without a start is text
    (True, "</think>Four.", Parts("", "Four.", True)),
])
def test_a_finished_reply_splits_at_the_end_of_its_thinking(opened, text, parts):
    assert ReasoningSplit(opened).parts(text, finished=True) == parts


@pytest.mark.parametrize("opened", [False, True])
@pytest.mark.parametrize("text", ["<think>Let me see: 2 + 2.</think>\n\nIt is 4.", "It is 4, </thinking> aside.",
                                  "Just thinking about <thi", "<th"])
def test_streamed_parts_only_grow_and_end_as_the_whole_split(opened, text):
    split, sent = ReasoningSplit(opened), Parts(None, "", False)
    for end in range(len(text) + 1):
        parts = split.parts(text[:end], finished=False)
        assert (parts.reasoning or "").startswith(sent.reasoning or "") and parts.content.startswith(sent.content)
        assert parts.answering >= sent.answering
        sent = parts
    assert split.parts(text, finished=True).content.startswith(sent.content)
    whole = ReasoningSplit(opened).parts(text, finished=True)
    assert (whole.reasoning or "").startswith(sent.reasoning or "") and whole.content.startswith(sent.content)


def test_a_tag_still_being_generated_is_held_back():
    assert ReasoningSplit(True).parts("It is 4.</thi", finished=False) == Parts("It is 4.", "", False)
    assert ReasoningSplit(False).parts(" <thi", finished=False) == Parts(None, "", False)
    assert ReasoningSplit(False).parts(" <thi", finished=True) == Parts(None, " <thi", True)


@pytest.fixture(scope="module")
def parser(smollm2_path):
    return ReasoningParser(AutoTokenizer.from_pretrained(smollm2_path))


@pytest.mark.parametrize(("prompt_end", "opened"), [
    ("<|im_start|>assistant\n<think>\n", True),  # R1's distills open the block in the prompt
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3, enable_thinking false
    ("<|im_start|>assistant\n", False),  # the model opens it, or does not think
    ("<think>Earlier turn.</think>Answer.<|im_end|>\n<|im_start|>assistant\n", False),
])
def test_the_prompt_says_whether_the_reply_starts_inside_its_thinking(parser, prompt_end, opened):
    prompt = parser.tokenizer.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n" + prompt_end)
    assert parser.opened_by(prompt) is opened


def test_the_answer_starts_after_the_tokens_of_the_end_of_thinking(parser):
    thinking, answer = parser.tokenizer.encode("<think>Hmm."), parser.tokenizer.encode(" Four.")
    assert parser.answer_start(thinking + list(parser.end_token_ids) + answer) == len(thinking) + len(
        parser.end_token_ids)
    assert parser.answer_start(thinking + answer) is None
