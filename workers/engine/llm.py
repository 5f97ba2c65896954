"""The offline Python API, in the convention users know from vLLM.

    llm = LLM()                                   # the embedded SmolLM2, on CPU
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)
"""

import inspect
import json
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from typing import Any

from jinja2 import TemplateError
from tqdm.auto import tqdm

from workers.engine.classification import Classification, classes_of, classified
from workers.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from workers.engine.errors import InvalidRequestError
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams, generation_config_defaults, recommended_fields
from workers.engine.scoring import cosine, pair_token_ids, score_pairs

Prompt = str | list[int]
Message = dict[str, str]


def chat_token_ids(tokenizer, messages: list[Message], add_generation_prompt: bool = True,
                   continue_final_message: bool = False, tools: list[dict] | None = None,
                   template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """A conversation rendered with the model's chat template, as token ids: by default the assistant's turn
    opened; with `continue_final_message` the last message left open instead, for the reply to carry on (an
    answer's start given by the caller). `tools` (OpenAI's function tools) go to templates that describe them;
    `template_kwargs` are the template's own variables (vLLM's chat_template_kwargs, e.g. enable_thinking), which
    may not stand in for apply_chat_template's parameters."""
    template_kwargs = dict(template_kwargs or {})
    # The template renders with `messages` besides apply_chat_template's parameters.
    reserved = {"messages", *inspect.signature(tokenizer.apply_chat_template).parameters}
    taken = sorted(set(template_kwargs) & reserved)
    if taken:
        raise InvalidRequestError("chat_template_kwargs", f"{', '.join(taken)} cannot be set here: the request's "
                                                          "own fields decide them")
    messages = [_with_argument_objects(message) for message in messages]
    try:
        return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message, tokenize=True,
                                                  return_dict=False, **template_kwargs))
    except (TemplateError, ValueError) as e:  # raise_exception() in the template, or a conversation it cannot end
        raise InvalidRequestError("messages", f"the model's chat template refused the conversation: {e}") from None


def _with_argument_objects(message: Message) -> Message:
    """An earlier tool call's arguments as the object they encode: templates render them with `tojson`, as
    transformers documents them (a dict), while OpenAI's clients send them as JSON text, which would render as one
    quoted string (Qwen2.5's, Llama 3.1's templates). Text that is not a JSON object stays as it is."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        try:
            value = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            value = None
        parsed.append(call if not isinstance(value, dict) else {**call, "function": {**function, "arguments": value}})
    return {**message, "tool_calls": parsed}


def engine_config(model: str = "smollm2", *, device: str = "cpu", dtype: str = "auto",
                  max_model_len: int | None = None, seed: int = 0, block_size: int = 16,
                  num_kv_blocks: int | None = None, kv_cache_memory_gb: float = 2.0,
                  gpu_memory_utilization: float = 0.85, enable_prefix_caching: bool = True,
                  kv_offload_gb: float = 0.0, kv_lease_s: float = 30.0, max_num_seqs: int = 64,
                  max_num_batched_tokens: int = 1024,
                  enable_chunked_prefill: bool = True, attention_backend: str = "torch",
                  enforce_eager: bool = False, num_speculative_tokens: int = 0, prompt_lookup_max: int = 4,
                  prompt_lookup_min: int = 2, scheduling_policy: str = "fcfs",
                  lora_modules: dict[str, str] | None = None, max_loras: int = 8) -> EngineConfig:
    """The nested EngineConfig from flat keyword arguments, as LLM(...) and the command line take them."""
    return EngineConfig(
        model=ModelConfig(model, device, dtype, max_model_len, seed, attention_backend, enforce_eager,
                          lora_modules=dict(lora_modules or {}), max_loras=max_loras),
        cache=CacheConfig(block_size, num_kv_blocks, kv_cache_memory_gb, gpu_memory_utilization,
                          enable_prefix_caching, kv_lease_s, kv_offload_gb=kv_offload_gb),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, scheduling_policy),
        speculative=SpeculativeConfig(num_speculative_tokens, prompt_lookup_max, prompt_lookup_min),
    )


class LLM:
    def __init__(self, model: str = "smollm2", *, progress: bool = True, generation_config: str = "auto",
                 **engine_args):
        """`engine_args` are engine_config's: device, dtype, num_kv_blocks, max_num_seqs, ... With
        `generation_config` "auto", generate and chat without sampling params run the model's recommended sampling
        (its generation_config.json: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), as
        vLLM's LLM does; "none": SamplingParams()."""
        if generation_config not in ("auto", "none"):
            raise ValueError(f"generation_config must be auto or none, got {generation_config!r}")
        self.engine = LLMEngine(engine_config(model, **engine_args), progress=progress)
        recommended = generation_config_defaults(self.engine.runner.model_dir) if generation_config == "auto" else {}
        self.default_sampling_params = SamplingParams(**recommended_fields(recommended))
        self.classes = classes_of(self.engine.runner.hf_config)  # a classifier's; None for other models

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def add_lora(self, name: str, folder: str) -> None:
        """Loads the LoRA adapter in `folder` (a PEFT folder) under `name`, which requests then give as
        SamplingParams(lora=name), beside the adapters of lora_modules; as vLLM's LLM adds a LoRARequest's."""
        self.engine.add_lora(name, folder)

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 cache_salt: str | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Runs every prompt to completion in one continuous batch; outputs come back in input order.

        A prompt is text or a list of token ids. All prompts are validated before any runs, so one bad prompt
        raises without leaving the others half-done.
        """
        prompts = _as_list(prompts)
        params = _per_prompt(self.default_sampling_params if sampling_params is None else sampling_params,
                             len(prompts))
        ids = self._add_all(lambda i: self.engine.add_request(prompts[i], params[i], cache_salt=cache_salt),
                            len(prompts))
        return self._run(ids, use_tqdm, "Generating")

    def embed(self, prompts: Prompt | Seq[Prompt], *, cache_salt: str | None = None, lora: str | None = None,
              use_tqdm: bool = False) -> list[RequestOutput]:
        """Each prompt's embedding (`out.embedding`: the last token's hidden state, normalized), as vLLM's LLM.embed
        gives an embedding model's; in one continuous batch, sharing the prefix cache with generate. `lora`: an
        adapter add_lora or lora_modules loaded."""
        if self.classes is not None:
            raise ValueError(f"{self.engine.runner.model_dir.name} is a classifier: it serves classify, not embed")
        return self._last_tokens(prompts, cache_salt, lora, use_tqdm, "Embedding")

    def classify(self, prompts: Prompt | Seq[Prompt], *, cache_salt: str | None = None, lora: str | None = None,
                 use_tqdm: bool = False) -> list[Classification]:
        """Each prompt's class probabilities and likeliest class, for a classifier or reward model (a
        *ForSequenceClassification checkpoint), as vLLM's LLM.classify gives them."""
        if self.classes is None:
            raise ValueError(f"{self.engine.runner.model_dir.name} has no classification head: only a "
                             "*ForSequenceClassification checkpoint classifies")
        outs = self._last_tokens(prompts, cache_salt, lora, use_tqdm, "Classifying")
        return [classified(out.embedding, self.classes) for out in outs]

    def score(self, text_1: str | Seq[str], text_2: str | Seq[str], *, cache_salt: str | None = None,
              lora: str | None = None, use_tqdm: bool = False) -> list[float]:
        """Each pair's score, as vLLM's LLM.score gives it: text_1 against every text_2, or the two lists one by
        one. An embedding model scores a pair by the cosine of its embeddings, a cross-encoder (a classifier of one
        class) by reading the pair together (workers/engine/scoring.py)."""
        firsts, seconds = _as_texts(text_1), _as_texts(text_2)
        pairs = score_pairs(firsts, seconds)
        if self.classes is None:
            vectors = [out.embedding for out in self.embed([*firsts, *seconds], cache_salt=cache_salt, lora=lora,
                                                           use_tqdm=use_tqdm)]
            return [cosine(vectors[i], vectors[len(firsts) + j]) for i, j in pairs]
        if len(self.classes.labels) != 1:
            raise ValueError(f"{self.engine.runner.model_dir.name} is a classifier of several classes, not a "
                             "cross-encoder: it serves classify, not score")
        prompts = [pair_token_ids(self.tokenizer, firsts[i], seconds[j]) for i, j in pairs]
        return [result.probs[0] for result in self.classify(prompts, cache_salt=cache_salt, lora=lora,
                                                            use_tqdm=use_tqdm)]

    def _last_tokens(self, prompts: Prompt | Seq[Prompt], cache_salt: str | None, lora: str | None, use_tqdm: bool,
                     desc: str) -> list[RequestOutput]:
        """Runs each prompt as an embedding request: its output is what the model makes of its last token."""
        prompts = _as_list(prompts)
        ids = self._add_all(lambda i: self.engine.add_embedding_request(prompts[i], cache_salt=cache_salt,
                                                                        lora=lora), len(prompts))
        return self._run(ids, use_tqdm, desc)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *, cache_salt: str | None = None,
             use_tqdm: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None) -> list[RequestOutput]:
        """Applies the model's chat template (with the assistant prompt appended) to each conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, cache_salt=cache_salt, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[Message],
                            chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, template_kwargs=chat_template_kwargs)

    def _add_all(self, add: Callable[[int], str], n: int) -> list[str]:
        """The ids of requests 0 .. n-1, each queued by `add`; one that is refused aborts those queued before it."""
        ids = []
        try:
            for i in range(n):
                ids.append(add(i))
        except ValueError:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool, desc: str) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc=desc, unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in ids]


def _as_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or several, as a list of prompts."""
    return [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)


def _as_texts(texts: str | Seq[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _per_prompt(params: SamplingParams | Seq[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)
