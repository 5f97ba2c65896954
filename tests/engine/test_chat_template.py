"""A conversation becomes the token ids its model's chat template renders, with the caller's template variables."""

import pytest
from transformers import AutoTokenizer

from workers.engine.errors import InvalidRequestError
from workers.engine.llm import chat_token_ids

MESSAGES = [{"role": "user", "content": "Is it raining?"}]


@pytest.fixture
def tokenizer(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    # A template with a variable of its own, as Qwen3's enable_thinking is.
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% if terse %} (briefly){% endif %}{% endif %}")
    return tokenizer


def test_template_kwargs_are_the_templates_variables(tokenizer):
    assert chat_token_ids(tokenizer, MESSAGES) == tokenizer.encode("user: Is it raining?\nassistant:")
    assert chat_token_ids(tokenizer, MESSAGES, template_kwargs={"terse": True}) == tokenizer.encode(
        "user: Is it raining?\nassistant: (briefly)")


def test_a_conversation_the_template_refuses_is_a_bad_request(tokenizer):
    tokenizer.chat_template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="messages: the model's chat template refused the conversation: "
                                                  "system first"):
        chat_token_ids(tokenizer, MESSAGES)


@pytest.mark.parametrize("name", ["add_generation_prompt", "tokenize", "tools", "messages"])
def test_template_kwargs_cannot_stand_in_for_the_requests_own_fields(tokenizer, name):
    with pytest.raises(InvalidRequestError, match=f"chat_template_kwargs: {name} cannot be set here"):
        chat_token_ids(tokenizer, MESSAGES, template_kwargs={name: False})


def test_an_earlier_calls_arguments_render_as_the_object_they_encode(tokenizer):
    """Qwen2.5's and Llama 3.1's templates write a call's arguments with `tojson`: JSON text from an OpenAI client
    is parsed first, or the model would see a quoted string; text that is no JSON object is left alone."""
    tokenizer.chat_template = ("{% for m in messages %}{% for c in m.get('tool_calls', []) %}"
                               "{{ c.function.name }}{{ c.function.arguments | tojson }}\n{% endfor %}{% endfor %}")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": "not json"}}]
    conversation = MESSAGES + [{"role": "assistant", "content": "", "tool_calls": calls}]
    assert chat_token_ids(tokenizer, conversation, add_generation_prompt=False) == tokenizer.encode(
        'weather{"city": "Paris"}\nclock"not json"\n')
