"""Structured outputs: the output matches its JSON schema, regex, choices or grammar, greedy tokens equal HF
transformers' under xgrammar's own logits processor for HF, and the structure holds wherever the request goes
(sampled, batched beside unstructured requests, preempted)."""

import json
import re
from dataclasses import replace

import jsonschema
import pytest
import torch
import xgrammar
from xgrammar.contrib.hf import LogitsProcessor

from tests.engine.test_disaggregation import move, run_until_finished
from tests.hf_reference import hf_greedy
from workers.engine.errors import InvalidRequestError
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams, StructuredOutput
from workers.engine.structured_output import RequestGrammar, grammar_of, token_bitmask

# Bounded, so that even sampled text from a small model ends within the test's max_tokens.
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "maximum": 120},
    "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age", "languages"]}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CAPITALS = ("Paris", "London", "Berlin", "Madrid")

# (question, structure, check of the text)
CASES = [
    ("Describe a software engineer as JSON.", StructuredOutput(json=PERSON),
     lambda text: jsonschema.validate(json.loads(text), PERSON)),
    ("Describe Paris as JSON.", StructuredOutput(json_object=True),
     lambda text: isinstance(json.loads(text), dict)),
    ("Give me a phone number in New York.", StructuredOutput(regex=PHONE),
     lambda text: re.fullmatch(PHONE, text)),
    ("What is the capital of Germany?", StructuredOutput(choice=CAPITALS), lambda text: text in CAPITALS),
    ("Is the sea salty?", StructuredOutput(grammar='root ::= ("yes" | "no") ", because " [a-z ]+ "."'),
     lambda text: re.fullmatch(r"(yes|no), because [a-z ]+\.", text)),
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return LLM(str(smollm2_path), num_kv_blocks=512, progress=False)


def chat(llm: LLM, question: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": question}])


def hf_structured(llm: LLM, path, prompt: list[int], structure: StructuredOutput, max_new_tokens: int) -> list[int]:
    """HF's greedy tokens under xgrammar's logits processor for HF, compiled for the same vocabulary."""
    engine = llm.engine
    info = xgrammar.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=engine.vocab_size,
                                                   stop_token_ids=sorted(engine.eos_token_ids))
    compiled = xgrammar.GrammarCompiler(info).compile_grammar(grammar_of(structure))
    return hf_greedy(path, prompt, max_new_tokens, logits_processor=[LogitsProcessor(compiled)],
                     eos_token_id=sorted(engine.eos_token_ids))


@pytest.mark.parametrize(("question", "structure", "check"), CASES, ids=[s.kind for _, s, _ in CASES])
def test_greedy_structured_output_matches_hf_and_its_structure(smollm2, smollm2_path, question, structure, check):
    prompt = chat(smollm2, question)
    out = smollm2.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                  structured_output=structure))[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    check(out.text)
    assert out.token_ids == hf_structured(smollm2, smollm2_path, prompt, structure, len(out.token_ids))


def test_sampled_outputs_keep_the_schema(smollm2):
    prompt = chat(smollm2, "Describe a software engineer as JSON.")
    outs = smollm2.generate([prompt] * 6, [SamplingParams(max_tokens=128, temperature=1.0, seed=seed,
                                                          structured_output=StructuredOutput(json=PERSON))
                                           for seed in range(6)])
    texts = [out.outputs[0].text for out in outs]
    assert len(set(texts)) > 1  # sampled, not greedy
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text), PERSON)


@pytest.mark.parametrize(("text", "taken"), [
    ('{"city": "Paris"}', True),
    ('{"city": "Par\x0b"}', False),  # a raw control character, which no JSON parser takes
    ('{"city": "Pa\tr"}', False),
    ('{"city": "Pa\\tri"}', True),  # escaped, it is one character of the five allowed
    ('{"city": "\\"Pa\\u00e9\\""}', True),
    ('{"city": "Parisian"}', False),
    ('{"city": "P"}', False),
])
def test_a_bounded_strings_characters_are_jsons(smollm2, text, taken):
    """A string with minLength or maxLength takes what any JSON string takes, each escape counting as one
    character, so the output always parses."""
    engine = smollm2.engine
    info = xgrammar.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=engine.vocab_size)
    schema = {"type": "object", "properties": {"city": {"type": "string", "minLength": 2, "maxLength": 5}},
              "required": ["city"], "additionalProperties": False}
    matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(info).compile_grammar(
        grammar_of(StructuredOutput(json=json.dumps(schema)))), terminate_without_stop_token=True)
    assert (matcher.accept_string(text) and matcher.is_terminated()) == taken
    if taken:
        assert 2 <= len(json.loads(text)["city"]) <= 5


def test_a_structured_request_leaves_its_batch_neighbours_alone(smollm2):
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [chat(smollm2, "Write a haiku about the sea."), chat(smollm2, "What is the capital of Germany?")]
    alone = smollm2.generate(prompts[0], plain)[0].outputs[0].token_ids
    together = smollm2.generate(prompts, [plain, SamplingParams(max_tokens=24, temperature=0.0,
                                                                structured_output=StructuredOutput(choice=CAPITALS))])
    assert together[0].outputs[0].token_ids == alone
    assert together[1].outputs[0].text in CAPITALS


def test_the_structure_holds_through_preemption(smollm2_path):
    """Four blocks of 16 tokens for two requests that need three each: one is preempted and recomputed, and its
    grammar carries on from the output it kept."""
    llm = LLM(str(smollm2_path), num_kv_blocks=5, progress=False)
    prompt = chat(llm, "JSON:")
    params = SamplingParams(max_tokens=20, temperature=0.0, structured_output=StructuredOutput(
        grammar='root ::= "{\\"digits\\": \\"" [0-9]+ "\\"}"'))
    alone = llm.generate(prompt, params)[0].outputs[0]
    outs = llm.generate([prompt, prompt], params)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        assert out.outputs[0].token_ids == alone.token_ids


def test_a_disaggregated_request_keeps_its_structure_across_the_handoff(smollm2, smollm2_path):
    """The prefill group samples the first token under the grammar; the decode group's grammar starts after it."""
    prompt = chat(smollm2, "Describe a software engineer as JSON.")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured_output=StructuredOutput(json=PERSON))
    unified = smollm2.generate(prompt, params)[0].outputs[0].token_ids
    p, d = smollm2.engine, LLM(str(smollm2_path), num_kv_blocks=64, progress=False).engine
    p.add_request(prompt, params, request_id="r", prefill_only=True)
    handoff = None
    while handoff is None:
        handoff = next((out.handoff for out in p.step() if out.finished), None)
    move(p, d, d.add_prefilled_request(handoff, params))
    first = d.start_prefilled_request(handoff)
    p.release_pinned("r")
    assert run_until_finished(d, "r", first) == unified


def test_a_structure_after_a_marker_leaves_the_output_free_until_the_marker(smollm2, smollm2_path):
    """As a reasoning model thinks before it answers: the output is the model's own up to the marker's tokens,
    then held to the structure, which starts afresh there (HF: the structure from the prompt plus the marker)."""
    prompt = chat(smollm2, "What is the capital of France?")
    free = smollm2.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0].outputs[0].token_ids
    marker = tuple(free[1:3])
    out = smollm2.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured_output=(
        StructuredOutput(choice=CAPITALS, after=marker))))[0].outputs[0]
    assert out.token_ids[:3] == free[:3]
    answer = hf_structured(smollm2, smollm2_path, prompt + free[:3], StructuredOutput(choice=CAPITALS), MAX_TOKENS)
    assert out.token_ids == free[:3] + answer
    assert smollm2.engine.tokenizer.decode(answer, skip_special_tokens=True) in CAPITALS


def test_the_first_token_decides_between_the_opener_and_the_structure(smollm2, smollm2_path):
    """As a model that opens its thinking itself (Qwen3) may instead answer at once: the first token may be the
    opener, which leaves the output free until the marker, or the structure's first."""
    prompt = chat(smollm2, "What is the capital of France?")
    free = smollm2.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0].outputs[0].token_ids
    marker = tuple(free[2:4])

    def held(opener: int) -> list[int]:
        structure = StructuredOutput(choice=CAPITALS, after=marker, opener=opener)
        return smollm2.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                       structured_output=structure))[0].outputs[0].token_ids

    answer = hf_structured(smollm2, smollm2_path, prompt + free[:4], StructuredOutput(choice=CAPITALS), MAX_TOKENS)
    assert held(opener=free[0]) == free[:4] + answer  # the model's own first token opens: free up to the marker
    from_the_start = smollm2.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                             structured_output=StructuredOutput(choice=CAPITALS)))
    # A token the model would not put first: it answers at once, held from its first token.
    assert held(opener=smollm2.engine.vocab_size - 1) == from_the_start[0].outputs[0].token_ids


def test_while_the_first_token_decides_the_mask_allows_the_opener_beside_the_structure(smollm2):
    engine = smollm2.engine
    compiled = engine.compile_grammar(StructuredOutput(choice=CAPITALS))
    allowed = token_bitmask([RequestGrammar(compiled)], [[]], engine.vocab_size)
    for opener in (95, 127):  # bit 31 of an int32 word is its sign
        deciding = RequestGrammar(compiled, after=(1,), opener=opener)
        mask = token_bitmask([deciding], [[]], engine.vocab_size)
        assert deciding.deciding and not allowed[0, opener // 32] >> (opener % 32) & 1
        assert mask[0, opener // 32] >> (opener % 32) & 1
        mask[0, opener // 32] = allowed[0, opener // 32]
        assert torch.equal(mask, allowed)


def test_a_structure_whose_marker_never_comes_leaves_the_whole_output_free(smollm2):
    prompt = chat(smollm2, "What is the capital of France?")
    free = SamplingParams(max_tokens=24, temperature=0.0)
    never = StructuredOutput(choice=CAPITALS, after=(smollm2.engine.vocab_size - 1,))
    assert smollm2.generate(prompt, replace(free, structured_output=never))[0].outputs[0].token_ids == \
        smollm2.generate(prompt, free)[0].outputs[0].token_ids


@pytest.mark.parametrize(("structure", "reason"), [
    (dict(json='{"type": "objectx"}'), r"json: Unsupported type \"objectx\""),
    (dict(json="{not json"), r"json: the schema is not valid JSON \(Expecting property name"),
    (dict(regex="a(b"), "regex: Regex parsing error"),
    (dict(grammar="root ::= undefined_rule"), "grammar: .*undefined_rule"),
])
def test_a_structure_that_does_not_parse_is_refused_with_the_reason(smollm2, structure, reason):
    with pytest.raises(InvalidRequestError, match=f"structured_output: {reason}"):
        smollm2.generate("Hi", SamplingParams(structured_output=StructuredOutput(**structure)))
    assert smollm2.generate("Hi", SamplingParams(max_tokens=2))[0].outputs[0].token_ids  # still serving


@pytest.mark.parametrize("kinds", [dict(), dict(json_object=True, regex="a+"), dict(choice=["a", ""]),
                                   dict(choice="ab")])
def test_a_structure_names_exactly_one_kind(kinds):
    with pytest.raises(InvalidRequestError, match="structured_output"):
        StructuredOutput(**kinds)


def test_sampling_params_take_a_structure_as_a_dict_of_its_fields():
    assert SamplingParams(structured_output={"json": PERSON}).structured_output == StructuredOutput(json=PERSON)
    with pytest.raises(InvalidRequestError, match="structured_output: must be a StructuredOutput or a dict"):
        SamplingParams(structured_output="json")


@pytest.mark.parametrize("other", [dict(ignore_eos=True), dict(min_tokens=2)])
def test_a_structure_leaves_the_end_to_its_grammar(smollm2, other):
    with pytest.raises(InvalidRequestError, match="structured_output: cannot be combined with ignore_eos or "
                                                  "min_tokens"):
        smollm2.generate("Hi", SamplingParams(structured_output=StructuredOutput(json_object=True), **other))


@pytest.mark.parametrize("other", [dict(allowed_token_ids=[5]), dict(bad_words=["no"])])
def test_a_structure_leaves_the_choice_of_tokens_to_its_grammar(smollm2, other):
    with pytest.raises(InvalidRequestError, match="structured_output: cannot be combined with allowed_token_ids or "
                                                  "bad_words"):
        smollm2.generate("Hi", SamplingParams(structured_output=StructuredOutput(json_object=True), **other))
