"""Request and response models of the OpenAI API, plus the CacheBlend extensions.

Extensions: `chunks` (chunk IDs or `{"text": ...}` objects), `cacheblend` (per-request
prefill overrides) and vLLM's `cache_salt` on chat and completion requests, a `cacheblend` object on responses, and
the `/v1/chunks` objects. Unknown request fields are ignored and logged, as vLLM does (the
`/v1/documents` requests, which no OpenAI client sends, refuse them: server/protocol_documents.py).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from engine.stats import RequestStats
from kvstore.keys import is_key

log = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("extra") != "forbid":  # forbidding ones refuse them
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                log.warning("%s: ignoring unknown fields %s", cls.__name__, unknown)
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        """JSON can escape a lone surrogate (\\ud800) that no tokenizer can take: refuse it here."""
        for text in value if isinstance(value, list) else (value,):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("text must be valid Unicode (it has a lone surrogate)") from None
        return value


# --- request field types -------------------------------------------------------------------

class ChunkText(OpenAIBaseModel):
    """A chunk given inline; it is registered on the fly."""
    text: str


def check_chunk_id(value: str) -> str:
    """A chunk ID is a content key; ValueError (with the message clients see) if malformed."""
    if not is_key(value):
        raise ValueError(f"invalid chunk ID {value[:80]!r}: expected 64 lowercase hex characters")
    return value


def _chunk_ref(value: Any) -> Any:
    if isinstance(value, str):
        return check_chunk_id(value)
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        if set(value) != {"text"}:
            log.warning("chunk object: ignoring unknown fields %s", sorted(set(value) - {"text"}))
        return ChunkText(text=value["text"])
    raise ValueError('each chunk must be a chunk ID (string) or an object {"text": string}')


ChunkRef = Annotated[Union[str, ChunkText], BeforeValidator(_chunk_ref)]


def _message_text(value: Any) -> Any:
    """Content as a string or a list of text parts (joined by newlines, as vLLM does)."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError('only text content parts ({"type": "text", "text": string}) are supported')
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt_text(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise ValueError("prompt must be a string or a list of one string")
        return value[0]
    return value


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class CacheBlendParams(OpenAIBaseModel):
    """Per-request prefill overrides; unset fields use the server's settings."""
    mode: Optional[str] = None
    recompute_ratio: Optional[float] = None
    check_layers: Optional[list[int]] = None
    check_ratios: Optional[list[float]] = None
    selection_signal: Optional[str] = None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(OpenAIBaseModel):
    """Fields shared by chat and completion requests."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # vLLM extension; 0 and -1 both mean off
    seed: Optional[int] = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what a 64-bit generator takes
    stop: Annotated[Optional[list[str]], BeforeValidator(_stop_list)] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    chunks: Optional[list[ChunkRef]] = None
    cacheblend: Optional[CacheBlendParams] = None
    # vLLM's: prefix-cache and chunk/turn KV reuse only among requests with the same salt
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: Optional[StreamOptions], info: ValidationInfo) -> Optional[StreamOptions]:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Optional[str], BeforeValidator(_message_text)] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None  # an assistant turn that called tools: refused, never dropped

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: Optional[list[Any]]) -> Optional[list[Any]]:
        if value:
            raise ValueError("tool calling is not supported")
        return value


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None      # refused by the serving class, never silently ignored
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None  # the deprecated form of tools: refused the same way
    function_call: Optional[Any] = None


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str, BeforeValidator(_prompt_text)]
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ChunkCreateRequest(OpenAIBaseModel):
    """`{"text": ...}` registers one chunk, `{"texts": [...]}` several."""
    text: Optional[str] = None
    texts: Optional[list[str]] = Field(None, min_length=1)
    shared: bool = False  # admin keys only: visible to (and usable by) every tenant

    @model_validator(mode="after")
    def _one_form(self) -> "ChunkCreateRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError('give either "text" or "texts"')
        return self


# --- responses -----------------------------------------------------------------------------

class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CacheBlendInfo(OpenAIBaseModel):
    """How the prompt's KV was made: reuse counts, where chunks were found, TTFT by phase."""
    mode: Optional[str] = None
    ratio: Optional[float] = None
    tokens_reused: int = 0
    tokens_recomputed: int = 0
    exact_tokens: int = 0   # prompt tokens by where their KV came from (before any recompute)
    chunk_tokens: int = 0
    turn_tokens: int = 0
    chunk_hits: dict[str, int] = Field(default_factory=dict)
    chunk_misses: int = 0
    ttft_s: Optional[float] = None
    queue_s: Optional[float] = None
    kv_fetch_s: Optional[float] = None
    selection_s: Optional[float] = None
    recompute_s: Optional[float] = None
    first_decode_s: Optional[float] = None

    @classmethod
    def from_stats(cls, stats: RequestStats) -> "CacheBlendInfo":
        values = {name: getattr(stats, name) for name in cls.model_fields}
        return cls(**{name: v for name, v in values.items() if v is not None})


class ChatMessageOut(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Optional[str]


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    cacheblend: CacheBlendInfo


class DeltaMessage(OpenAIBaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None
    cacheblend: Optional[CacheBlendInfo] = None


class CompletionChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    cacheblend: CacheBlendInfo


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None
    cacheblend: Optional[CacheBlendInfo] = None


class ChunkObject(OpenAIBaseModel):
    id: str
    object: Literal["chunk"] = "chunk"
    tokens: int
    created: int
    shared: Optional[bool] = None  # set (true) on shared chunks only
    text: Optional[str] = None  # only when one chunk is retrieved


class ChunkList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ChunkObject]
    has_more: Optional[bool] = None  # set on listings, not on batch registration


class ChunkDeleted(OpenAIBaseModel):
    id: str
    object: Literal["chunk"] = "chunk"
    deleted: bool = True


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "cacheblend"
    root: str
    max_model_len: int


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
