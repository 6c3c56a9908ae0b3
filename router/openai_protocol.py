"""The OpenAI-compatible API's wire shapes: one typed model per request body, and the responses.

Request bodies refuse unknown fields (`extra="forbid"`): a field we would not honour is answered with a 400
naming it, never silently ignored. OpenAI fields we do not serve (the legacy `functions`) are declared so the
error can say so; the server refuses them when set. Bounds (temperature,
max_tokens, ...) are not repeated here: they are checked in router/validation.py, as for gRPC.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

UINT64 = 2**64 - 1  # the gRPC API's seed range, so a seed means the same through both


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: bool = False


class StructuredOutputs(Body):
    """vLLM's `structured_outputs`: one constraint on the output."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: str | dict[str, Any] | bool | None = Field(None, alias="json")  # a JSON schema, or its JSON text
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF


class JsonSchemaFormat(Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class VllmExtras(Body):
    """Sampling and stopping knobs beyond OpenAI's that vLLM's users send (same names, same meaning)."""

    top_k: int | None = None  # 0 or -1: off
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    cache_salt: str | None = None  # prefix-cache isolation: only requests with the same salt share blocks
    structured_outputs: StructuredOutputs | None = None


class Sampling(VllmExtras):
    """The fields both request bodies share."""

    model: str | None = None  # absent: the served model
    response_format: ResponseFormat | None = None  # OpenAI's, on chat; vLLM takes it on completions too
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int = 1
    seed: int | None = Field(None, ge=0, le=UINT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None  # an end-user id for abuse monitoring: accepted, not logged (no request ids in logs)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None  # refused unless equal to n (no server-side ranking)
    suffix: str | None = None  # refused: Qwen2 has no fill-in-the-middle mode


class ContentPart(BaseModel):
    """One part of a message's content; only `text` parts are served (checked by the server, to say so)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (OpenAI's shape)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # wins over max_tokens, its deprecated spelling
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # The legacy spelling of tools: refused when set.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # vLLM's chat template controls.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeCompletionRequest(Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # Qwen2's tokenizer adds none either way
    return_token_strs: bool = False


class TokenizeChatRequest(Body):
    model: str | None = None
    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


# -- responses ------------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


def _absent_if_none(default=None):
    """A field left out of the JSON when None (OpenAI's argument deltas carry only index and arguments)."""
    return Field(default, exclude_if=lambda value: value is None)


class FunctionCall(BaseModel):
    name: str | None = _absent_if_none()
    arguments: str  # a JSON object as text (in a stream: a fragment of it)


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = _absent_if_none()
    type: Literal["function"] | None = _absent_if_none()
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field([], exclude_if=lambda calls: not calls)  # absent unless it called


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=lambda calls: calls is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen2-cluster"
    max_model_len: int
    quantization: str  # "none" or the weights' 4/8-bit format
    tasks: list[str]  # what the checkpoint serves: generate, embed, classify, token_classify, qa


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- pooling: /v1/embeddings (OpenAI), /classify and /pooling (vLLM) -------------------------------------------
# One text, one list of token ids, or a list of either.
PoolingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(Body):
    model: str | None = None
    input: PoolingInput
    encoding_format: Literal["float", "base64"] = "float"  # base64: the float32 values' little-endian bytes
    dimensions: int | None = None  # the first `dimensions` values (Matryoshka), normalised after truncation
    user: str | None = None
    pooling: Literal["last", "mean"] | None = None  # ours: the last token's hidden state (default) or the mean
    normalize: bool | None = None  # ours: L2-normalise (default true)


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: PoolingUsage


class ClassifyRequest(Body):
    model: str | None = None
    input: PoolingInput
    user: str | None = None


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: PoolingUsage


class PoolingRequest(Body):
    model: str | None = None
    input: PoolingInput
    task: str | None = None  # embed, classify, token_classify or qa; default: the checkpoint's head, else embed
    pooling: Literal["last", "mean"] | None = None  # embed's options, as in EmbeddingRequest
    normalize: bool | None = None
    dimensions: int | None = None
    user: str | None = None


class PoolingData(BaseModel):
    object: Literal["pooling"] = "pooling"
    index: int
    # embed [dimensions]; classify: the logits [labels]; token_classify [tokens][labels]; qa [tokens][start, end]
    data: list[float] | list[list[float]]


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: PoolingUsage
