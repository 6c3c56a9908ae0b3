"""Typed results: plain dataclasses built from the protobuf responses (no protobuf types leak out)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from .proto import serving_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


def finish_reason_name(value: int) -> str:
    """"length" / "stop" / "eos" / "cancelled" ("unspecified" for 0 or a value this SDK does not know)."""
    return FINISH_REASONS.get(value, "unspecified")


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob and, when `logprobs=N` > 0 was asked, the N most likely alternatives."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_pb(cls, m: pb.TokenLogprob) -> "TokenLogprob":
        return cls(m.token_id, m.logprob, [TopLogprob(t.token_id, t.logprob) for t in m.top])


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache already held


@dataclass(frozen=True)
class Timings:
    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class FinalInfo:
    finish_reason: str = "unspecified"
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    matched_stop: str | None = None  # the stop string that ended the generation, if one did
    rope_variant: str = ""  # "original" or "yarn"

    @classmethod
    def from_pb(cls, m: pb.FinalInfo) -> "FinalInfo":
        return cls(
            finish_reason=finish_reason_name(m.finish_reason),
            usage=Usage(m.usage.prompt_tokens, m.usage.generated_tokens, m.usage.cached_tokens),
            timings=Timings(m.timings.queue_seconds, m.timings.time_to_first_token_seconds,
                            m.timings.total_seconds),
            matched_stop=m.matched_stop or None,
            rope_variant=m.rope_variant,
        )


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (chat with tools): `arguments` is a JSON object as text, as the model wrote it."""

    id: str
    name: str
    arguments: str

    @classmethod
    def from_pb(cls, m: pb.ToolCall) -> "ToolCall":
        return cls(m.id, m.name, m.arguments)


@dataclass(frozen=True)
class ToolCallDelta:
    """A streamed call as OpenAI streams it: the first delta of call `index` has its id and name (arguments
    ""), the next ones fragments of its arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


def _add_up(deltas: Iterable[ToolCallDelta]) -> list[ToolCall]:
    calls: dict[int, list[str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, ["", "", ""])
        call[0], call[1] = call[0] or d.id, call[1] or d.name
        call[2] += d.arguments
    return [ToolCall(*calls[i]) for i in sorted(calls)]


@dataclass(frozen=True)
class Result:
    """One finished generation (Generate, or a GenerateStream collected with `Result.from_deltas`)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str
    usage: Usage
    timings: Timings
    matched_stop: str | None = None
    rope_variant: str = ""
    # With prompt_logprobs=N: one per prompt token after the first (which has no context).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # chat with tools: `text` keeps the rest

    @classmethod
    def from_pb(cls, m: pb.GenerateResponse) -> "Result":
        final = FinalInfo.from_pb(m.final) if m.HasField("final") else FinalInfo()
        return cls(
            request_id=m.request_id, text=m.text, token_ids=list(m.token_ids),
            logprobs=[TokenLogprob.from_pb(lp) for lp in m.logprobs],
            finish_reason=final.finish_reason, usage=final.usage, timings=final.timings,
            matched_stop=final.matched_stop, rope_variant=final.rope_variant,
            prompt_logprobs=[TokenLogprob.from_pb(lp) for lp in m.prompt_logprobs],
            tool_calls=[ToolCall.from_pb(c) for c in m.tool_calls],
        )

    @classmethod
    def from_deltas(cls, deltas: Iterable["Delta"]) -> "Result":
        """Concatenate a stream's deltas into the Result that Generate would have returned."""
        text, ids, lps, prompt_lps, final, request_id = [], [], [], [], FinalInfo(), ""
        call_deltas, whole_calls = [], []
        for d in deltas:
            call_deltas += d.tool_call_deltas
            whole_calls += d.tool_calls
            text.append(d.text)
            ids.extend(d.token_ids)
            lps.extend(d.logprobs)
            prompt_lps.extend(d.prompt_logprobs)
            request_id = d.request_id or request_id
            if d.final is not None:
                final = d.final
        return cls(request_id=request_id, text="".join(text), token_ids=ids, logprobs=lps,
                   finish_reason=final.finish_reason, usage=final.usage, timings=final.timings,
                   matched_stop=final.matched_stop, rope_variant=final.rope_variant, prompt_logprobs=prompt_lps,
                   tool_calls=_add_up(call_deltas) if call_deltas else whole_calls)  # servers before deltas: whole

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Delta:
    """One GenerateStream message: the text and tokens new since the previous one; `final` on the last."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    final: FinalInfo | None = None
    request_id: str = ""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # on the first delta, as in Result
    tool_calls: list[ToolCall] = field(default_factory=list)  # each call once it is whole
    tool_call_deltas: list[ToolCallDelta] = field(default_factory=list)  # the calls as they are written

    @classmethod
    def from_pb(cls, m: pb.GenerateStreamResponse) -> "Delta":
        return cls(text=m.text, token_ids=list(m.token_ids),
                   logprobs=[TokenLogprob.from_pb(lp) for lp in m.logprobs],
                   final=FinalInfo.from_pb(m.final) if m.HasField("final") else None,
                   request_id=m.request_id,
                   prompt_logprobs=[TokenLogprob.from_pb(lp) for lp in m.prompt_logprobs],
                   tool_calls=[ToolCall.from_pb(c) for c in m.tool_calls],
                   tool_call_deltas=[ToolCallDelta(d.index, d.id, d.name, d.arguments) for d in m.tool_call_deltas])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenizeResult:
    token_ids: list[int]
    tokens: list[str]
    rendered: str = ""  # the chat template's output, for chat input

    @classmethod
    def from_pb(cls, m: pb.TokenizeResponse) -> "TokenizeResult":
        return cls(list(m.token_ids), list(m.tokens), m.rendered)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    tensor_parallel_size: int
    pipeline_parallel_size: int
    dtype: str
    device: str
    max_new_tokens_limit: int
    num_kv_blocks: int
    block_size: int
    version: str
    quantization: str = ""  # "none", or the weights' format (servers before it: "")
    tasks: list[str] = field(default_factory=list)  # "generate", "embed", "classify", "token_classify", "qa"
    architecture: str = ""
    labels: list[str] = field(default_factory=list)  # the classification head's, by label id

    @classmethod
    def from_pb(cls, m: pb.ModelInfoResponse) -> "ModelInfo":
        return cls(
            model=m.model, max_model_len=m.max_model_len, vocab_size=m.vocab_size,
            eos_token_ids=list(m.eos_token_ids), tensor_parallel_size=m.tensor_parallel_size,
            pipeline_parallel_size=m.pipeline_parallel_size, dtype=m.dtype, device=m.device,
            max_new_tokens_limit=m.max_new_tokens_limit, num_kv_blocks=m.num_kv_blocks,
            block_size=m.block_size, version=m.version, quantization=m.quantization, tasks=list(m.tasks),
            architecture=m.architecture, labels=list(m.labels),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Embedding:
    values: list[float]
    prompt_tokens: int

    @classmethod
    def from_pb(cls, m: pb.Embedding) -> "Embedding":
        return cls(list(m.values), m.prompt_tokens)


@dataclass(frozen=True)
class Classification:
    """A sequence's (or a token's) label: the most probable one, and every label's probability and logit."""

    label_id: int
    label: str
    probs: list[float]
    logits: list[float]
    prompt_tokens: int = 0  # a sequence's; 0 for a token's

    @classmethod
    def from_pb(cls, m: pb.Classification) -> "Classification":
        return cls(m.label_id, m.label, list(m.probs), list(m.logits), m.prompt_tokens)


@dataclass(frozen=True)
class TokenClassification:
    token_ids: list[int]
    tokens: list[Classification]  # one per token

    @classmethod
    def from_pb(cls, m: pb.TokenClassification) -> "TokenClassification":
        return cls(list(m.token_ids), [Classification.from_pb(t) for t in m.tokens])


@dataclass(frozen=True)
class QAResult:
    """Start/end logits per token and the best span: tokens [answer_start, answer_end] (inclusive), its text."""

    token_ids: list[int]
    start_logits: list[float]
    end_logits: list[float]
    answer_start: int
    answer_end: int
    answer: str
    score: float

    @classmethod
    def from_pb(cls, m: pb.QAResult) -> "QAResult":
        return cls(list(m.token_ids), list(m.start_logits), list(m.end_logits), m.answer_start, m.answer_end,
                   m.answer, m.score)
