"""Telling a reasoning model's thinking from its answer, whole and while the reply streams, whichever side of the
prompt opens the <think> block."""

import pytest
from transformers import AutoTokenizer

from router.reasoning import END, START, Parts, ReasoningParser, ReasoningSplit
from workers.engine.sampling_params import StructuredOutput


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


@pytest.fixture(scope="module")
def thinking_parser(smollm2_path):
    """Over a vocabulary that holds <think> and </think> as one token each, as reasoning models' do."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [START, END]})
    return ReasoningParser(tokenizer)


@pytest.mark.parametrize(("prompt_end", "after", "opener"), [
    ("<|im_start|>assistant\n<think>\n", True, False),  # from the end of the thinking the prompt opened
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False, False),  # thinking off: from the first token
    ("<|im_start|>assistant\n", True, True),  # the model may open it: its first token decides
    ("<think>Earlier turn.</think>Answer.<|im_end|>\n<|im_start|>assistant\n", True, True),
])
def test_a_structure_holds_the_answer_wherever_the_thinking_starts(thinking_parser, prompt_end, after, opener):
    prompt = thinking_parser.tokenizer.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n" + prompt_end)
    held = thinking_parser.held(StructuredOutput(json_object=True), prompt)
    assert held.after == (thinking_parser.end_token_ids if after else ())
    assert held.opener == (thinking_parser.start_token_id if opener else None)
    assert len(thinking_parser.end_token_ids) == 1


def test_a_vocabulary_that_spells_think_in_pieces_holds_a_structure_the_model_may_open_from_the_start(parser):
    held = parser.held(StructuredOutput(json_object=True), parser.tokenizer.encode("<|im_start|>assistant\n"))
    assert (parser.start_token_id, held.after, held.opener) == (None, (), None)
