"""The HTTP API's request bodies (router/openai_api.py): OpenAI's fields with vLLM's extensions, everything optional
that OpenAI's are, and null meaning the default (clients send nulls). Fields a body does not know are kept and
ignored, as vLLM does."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from router.openai_structured import ResponseFormat


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: with include_usage, every chunk has its usage so far


class GenerationBody(BaseModel):
    """What the three generating endpoints (completions, chat, responses) take."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    priority: int | None = None  # vLLM's: with scheduling_policy "priority", lower runs first
    request_id: str | None = None
    cache_salt: str | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class ChatBody(GenerationBody):
    messages: list[ChatMessage]
    add_generation_prompt: bool | None = True  # vLLM's: open the assistant's turn
    continue_final_message: bool | None = False  # vLLM's: continue the last message instead
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: the template's own variables
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class InputItem(BaseModel):
    """An item of a Responses API input: a message (the default type), an earlier function call or its output."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: str | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call
    output: str | None = None  # function_call_output


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: ResponseFormat | None = None


class ResponsesBody(GenerationBody):
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    store: bool | None = True
    background: bool | None = None
    metadata: dict[str, str] | None = None


class InputTokensBody(BaseModel):
    """What POST /v1/responses/input_tokens reads of a Responses API request: what makes up its prompt."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    tools: list[dict] | None = None


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None  # keep the first values, normalized again
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's
    request_id: str | None = None  # vLLM's
    cache_salt: str | None = None


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


class RerankBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = None  # null: every document
    return_documents: bool | None = True
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


class LoadLoRABody(BaseModel):
    """vLLM's LoadLoRAAdapterRequest."""

    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRABody(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
