"""The public API's limits and security, one section (`api:`) of the cluster config.

Every limit has a clear error when exceeded (INVALID_ARGUMENT / HTTP 400 naming the field, or
RESOURCE_EXHAUSTED / 429 for size and concurrency), so a client learns what to change instead of timing out.
Security is off by default for the local quick start and on in the Helm chart.
"""

import os
from dataclasses import dataclass, field

from router.reasoning import REASONING_PARSERS
from router.tool_parsers import TOOL_CALL_PARSERS

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _field(default, doc: str):
    return field(default=default, metadata={"help": doc})


@dataclass(frozen=True)
class ApiConfig:
    max_request_bytes: int = _field(4 * 1024 * 1024, "largest request message or HTTP body, in bytes")
    max_tokens: int | None = _field(None, "largest max_tokens a request may ask for (null: the context length)")
    max_stop_strings: int = _field(16, "most stop strings per request")
    max_bad_words: int = _field(256, "most bad_words per request (each is tokenized as the request arrives)")
    max_cache_salt_chars: int = _field(256, "longest cache_salt")
    max_choices: int = _field(64, "most completions one HTTP request may ask for: n times the prompts of a batch")
    max_embedding_inputs: int = _field(2048, "most inputs one embeddings request may carry (OpenAI's limit)")
    response_ttl_s: int = _field(600, "how long a stored Responses API response can be retrieved or continued "
                                      "(previous_response_id), in seconds; Redis holds each (with its "
                                      "conversation) that long")
    response_store_url: str | None = _field(None, "redis://[:password@]host:port/db where stored Responses API "
                                                  "responses (and background runs) live (null: the cluster's "
                                                  "Redis, which holds the KV-block index and may run without "
                                                  "persistence, so a restart forgets them)")
    tool_call_parser: str | None = _field(None, "how tool_choice \"auto\" finds tool calls in the model's text: "
                                                "\"hermes\" (<tool_call>{...}</tool_call>: Qwen2.5, Qwen3, Hermes), "
                                                "\"llama3_json\" ({\"name\", \"parameters\"}: Llama 3.1, 3.2) or "
                                                "\"mistral\" ([TOOL_CALLS] [{\"name\", \"arguments\"}]: Mistral "
                                                "7B v0.3, Nemo, Small; [TOOL_CALLS]name[ARGS]{...}: Small 3.1 on, "
                                                "Magistral, Devstral), \"granite\" (<|tool_call|> or <tool_call> "
                                                "and [{\"name\", \"arguments\"}]: Granite 3) or \"pythonic\" "
                                                "([get_weather(city=\"Paris\")]: Llama 3.2 1B/3B, Llama 4); "
                                                "null: \"auto\" is refused, a named or required choice still works")
    reasoning_parser: str | None = _field(None, "how a reasoning model's thinking is told from its answer: "
                                                "\"deepseek_r1\" or \"qwen3\" (both <think>...</think>: "
                                                "DeepSeek-R1 and its distills, QwQ, Qwen3); the chat API returns it "
                                                "as reasoning_content, the Responses API as a reasoning item; null: "
                                                "the reply is all answer")
    max_concurrent_requests: int | None = _field(None, "requests one ingress replica serves at once; more get "
                                                       "RESOURCE_EXHAUSTED / 429 at once (null: no limit)")
    allow_runtime_lora: bool = _field(False, "clients may load and unload LoRA adapters while the cluster runs "
                                             "(POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM's "
                                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING); an adapter's folder must be "
                                             "readable at the same absolute path wherever a worker group runs")
    migration_limit: int = _field(3, "times a request moves to another decode group when the one streaming it is "
                                     "lost (its process or node died); the new group carries on from the tokens "
                                     "already streamed, so the caller sees one stream (Dynamo's request migration); "
                                     "0: such a request ends UNAVAILABLE")
    allowed_origins: str | None = _field(None, "web pages that may call the HTTP API from a browser (CORS): "
                                               "origins separated by commas (https://app.example.com), or * for "
                                               "any, as vLLM's default; null: none (server-side clients need none)")
    api_key: str | None = _field(None, "key clients must send as 'authorization: Bearer <key>' "
                                       "(null: $TANDEM_API_KEY when set, else no key)")
    tls_cert_file: str | None = _field(None, "PEM server certificate: gRPC and HTTP speak TLS (read where the "
                                             "server runs)")
    tls_key_file: str | None = _field(None, "PEM private key of tls_cert_file")
    tls_client_ca_file: str | None = _field(None, "PEM CA bundle: gRPC clients must present a certificate it "
                                                  "signed (mutual TLS)")

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_tokens", "max_stop_strings", "max_bad_words", "max_cache_salt_chars",
                     "max_choices", "max_embedding_inputs", "response_ttl_s", "max_concurrent_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value!r})")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0 (got {self.migration_limit!r})")
        if self.response_store_url is not None and not self.response_store_url.startswith(_REDIS_SCHEMES):
            raise ValueError(f"response_store_url must be a Redis URL ({', '.join(_REDIS_SCHEMES)}...) (got "
                             f"{self.response_store_url!r})")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"tool_call_parser must be null or one of {', '.join(TOOL_CALL_PARSERS)} (got "
                             f"{self.tool_call_parser!r})")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be null or one of {', '.join(REASONING_PARSERS)} (got "
                             f"{self.reasoning_parser!r})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        for origin in self.origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"allowed_origins must be * or origins such as https://app.example.com (got "
                                 f"{origin!r})")

    @property
    def origins(self) -> list[str]:
        """allowed_origins as a list: empty when none may call from a browser."""
        return [o.strip() for o in (self.allowed_origins or "").split(",") if o.strip()]

    @property
    def key(self) -> str | None:
        """The API key in force: the configured one, else $TANDEM_API_KEY (how a Kubernetes Secret arrives)."""
        return self.api_key or os.environ.get("TANDEM_API_KEY") or None
