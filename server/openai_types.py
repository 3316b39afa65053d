"""OpenAI's request and response bodies as msgspec Structs.

Request bodies ignore unknown fields on purpose: OpenAI clients send fields this server
does not know, and rejecting them would break the stock client. Responses follow
OpenAI's shapes field for field, nulls included.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from engine.sampling import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_CONSTRAINT_CHARS
from engine.spec_config import SpeculativeOverride

MaxTokens = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
ChoiceCount = Annotated[int, Meta(ge=1, le=128)]
FinishReason = Literal["stop", "length", "abort"]
# One array type per msgspec union: a prompt is text, or a list whose items are all
# strings, all token ids, or all token-id lists (checked after decoding).
Prompt = str | Annotated[list[str | int | list[int]], Meta(min_length=1)]
# Constraints are compiled per request: the engine's limits, refused at decoding already
# (a schema given as an object is measured as JSON text by SamplingParams.validate).
ConstraintText = Annotated[str, Meta(max_length=MAX_CONSTRAINT_CHARS)]
Choices = Annotated[
    list[Annotated[str, Meta(max_length=MAX_CHOICE_CHARS)]],
    Meta(min_length=1, max_length=MAX_CHOICES),
]


class StreamOptions(Struct, kw_only=True):
    """`stream_options`: ask for a final chunk carrying token usage."""

    include_usage: bool = False


class SamplingFields(Struct, kw_only=True):
    """Fields shared by completion and chat requests, OpenAI's plus vLLM-style extensions."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: ChoiceCount = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM names)
    top_k: int | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # compound extension: speculative decoding for this request, e.g. {"method": "ngram"}
    speculative: SpeculativeOverride | None = None
    # constrained decoding (vLLM names); at most one, and not with a JSON response_format
    guided_json: dict[str, Any] | ConstraintText | None = None
    guided_regex: ConstraintText | None = None
    guided_choice: Choices | None = None
    guided_grammar: ConstraintText | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    """`POST /v1/completions`."""

    prompt: Prompt
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(Struct, tag="text", tag_field="type"):
    """A text part of a message's content list; other part types are rejected."""

    text: str


class ChatMessage(Struct, kw_only=True):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class JsonSchemaFormat(Struct, kw_only=True):
    """`response_format.json_schema`: the schema the reply must match (always enforced)."""

    name: str = "response"
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    """`response_format`: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class CompoundChatOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    """Extension of a chat request to a pipeline (`extra_body={"compound": {...}}`)."""

    # with `stream`, also send the run's step events as `event: compound.<type>` SSE
    # (for SSE-aware clients: the stock `openai` client reads every event as a chunk)
    events: bool = False


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    compound: CompoundChatOptions | None = None  # extension: pipelines as chat models


class SpeculativeUsage(Struct, kw_only=True):
    """compound extension of `usage`: draft tokens verified and accepted by the target."""

    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float


class Usage(Struct, kw_only=True, omit_defaults=True):
    """Token counts of one request (`speculative` only when some draft was verified)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative: SpeculativeUsage | None = None


class CompletionLogprobs(Struct, kw_only=True):
    """Legacy completions logprobs, one list entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    """One choice of a completion, or of a completion chunk."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(Struct, kw_only=True):
    """Response of `POST /v1/completions`; also the chunk shape when streaming."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(Struct, kw_only=True):
    """One alternative token with its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Struct, kw_only=True):
    """A generated token, its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct, kw_only=True):
    """`logprobs` of a chat choice."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(Struct, kw_only=True):
    """The message a chat choice returns."""

    content: str | None
    role: Literal["assistant"] = "assistant"
    refusal: str | None = None


class ChatChoice(Struct, kw_only=True):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(Struct, kw_only=True):
    """Response of `POST /v1/chat/completions`."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(Struct, kw_only=True, omit_defaults=True):
    """The new part of a streamed chat message; absent fields are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Struct, kw_only=True):
    """One choice of a chat completion chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One server-sent event of a streamed chat completion."""

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(Struct, kw_only=True):
    """One entry of `GET /v1/models`."""

    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "compound"
    parent: str | None = None  # an adapter's base model


class ModelList(Struct, kw_only=True):
    """Response of `GET /v1/models`."""

    data: list[ModelCard] = field(default_factory=list)
    object: Literal["list"] = "list"


class ErrorBody(Struct, kw_only=True):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct, kw_only=True):
    """The body of every error response: `{"error": {...}}`."""

    error: ErrorBody
