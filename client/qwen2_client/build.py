"""Building request messages: only the parameters given are set (explicit presence), one input kind."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Union

from typing_extensions import TypedDict

from .proto import serving_pb2 as pb


class GenerationParams(TypedDict, total=False):
    """Keyword arguments mirroring GenerationParameters; an unset one takes the server's default."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: Union[str, Sequence[str]]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int  # top-n per generated token (0 = the chosen token's logprob only)
    logit_bias: Mapping[int, float]  # token id -> bias in [-100, 100], added to its logit
    min_tokens: int  # no EOS, stop token or stop string before this many tokens
    prompt_logprobs: int  # top-n per prompt token (given: each prompt token's logprob; max_new_tokens may be 0)
    skip_special_tokens: bool  # in the text (default true)
    include_stop_str_in_output: bool  # keep the matched stop string in the text (default false)
    cache_salt: str  # share cached prompt blocks only with requests of the same salt (a tenant's)
    # Structured outputs, at most one: the output matches it.
    json_schema: Union[str, Mapping[str, Any]]  # a JSON schema (a mapping, or its JSON text)
    json_object: bool  # any JSON object
    regex: str
    choice: Sequence[str]  # exactly one of these strings
    grammar: str  # a context-free grammar in EBNF (`root` starts it)


PARAM_NAMES = tuple(f.name for f in pb.GenerationParameters.DESCRIPTOR.fields)
_REPEATED = {"stop", "stop_token_ids"}
_INTS = {"max_new_tokens", "top_k", "seed", "logprobs", "min_tokens", "prompt_logprobs"}
_BOOLS = {"ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "json_object"}
_STRINGS = {"cache_salt", "regex", "grammar"}
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}

Message = Union[Mapping[str, Any], Sequence[str], pb.ChatMessage]
Prompt = Union[str, Sequence[int], Sequence[Message]]
# OpenAI's {"type": "function", "function": {"name", "description", "parameters"}}, the inner dict alone, or a Tool.
ToolSpec = Union[Mapping[str, Any], pb.Tool]
# "auto", "none", "required", or a function: {"type": "function", "function": {"name": ...}} or {"name": ...}.
ToolChoice = Union[str, Mapping[str, Any]]


def build_parameters(**params: Any) -> pb.GenerationParameters:
    """GenerationParameters with exactly the fields whose value is not None."""
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise TypeError(f"unknown generation parameter(s): {', '.join(unknown)} "
                        f"(known: {', '.join(PARAM_NAMES)})")
    out = pb.GenerationParameters()
    for name, value in params.items():
        if value is None:
            continue
        if name == "stop":
            out.stop.extend([value] if isinstance(value, str) else list(value))
        elif name == "stop_token_ids":
            out.stop_token_ids.extend(_ints(name, value))
        elif name == "logit_bias":
            if not isinstance(value, Mapping):
                raise TypeError(f"logit_bias must be a mapping of token id to bias, got {value!r}")
            out.logit_bias.update({_int("logit_bias token id", t): _float(name, b) for t, b in value.items()})
        elif name in _STRINGS:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r}")
            setattr(out, name, value)
        elif name == "json_schema":
            out.json_schema = value if isinstance(value, str) else json.dumps(value)
        elif name == "choice":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(f"choice must be a sequence of strings, got {value!r}")
            out.choice.choices.extend(str(c) for c in value)
        elif name in _BOOLS:
            setattr(out, name, bool(value))
        elif name in _INTS:
            setattr(out, name, _int(name, value))
        else:
            assert name in _FLOATS, name
            setattr(out, name, _float(name, value))
    return out


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _ints(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of integers, got {values!r}")
    return [_int(name, v) for v in values]


def chat_message(m: Message) -> pb.ChatMessage:
    """{"role", "content"} mapping (an assistant turn's `tool_calls` and a tool turn's `tool_call_id` too, in
    OpenAI's shape), (role, content) pair, ChatMessage, or an object with .role/.content."""
    if isinstance(m, pb.ChatMessage):
        return m
    if isinstance(m, Mapping):
        if "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise ValueError(f"a chat message needs 'role' and 'content', got keys {sorted(m)}")
        out = pb.ChatMessage(role=str(m["role"]), content=str(m.get("content") or ""),
                             tool_calls=[tool_call(c) for c in m.get("tool_calls") or ()])
        if m.get("tool_call_id"):
            out.tool_call_id = str(m["tool_call_id"])
        return out
    if isinstance(m, Sequence) and not isinstance(m, str) and len(m) == 2:
        return pb.ChatMessage(role=str(m[0]), content=str(m[1]))
    if hasattr(m, "role") and hasattr(m, "content"):
        return pb.ChatMessage(role=str(m.role), content=str(m.content))
    raise TypeError(f"not a chat message: {m!r}")


def tool_call(c: Any) -> pb.ToolCall:
    """A history call: OpenAI's {"id", "type", "function": {"name", "arguments"}}, {"id", "name", "arguments"},
    or a ToolCall (this SDK's or the proto's); arguments as JSON text or a mapping."""
    if isinstance(c, pb.ToolCall):
        return c
    if isinstance(c, Mapping):
        fn = c.get("function") or c
        call_id, name, arguments = c.get("id"), fn.get("name"), fn.get("arguments", {})
    else:
        call_id, name, arguments = getattr(c, "id", None), getattr(c, "name", None), getattr(c, "arguments", "{}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a function name, got {c!r}")
    return pb.ToolCall(id=str(call_id or ""), name=name,
                       arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))


def tool(t: ToolSpec) -> pb.Tool:
    if isinstance(t, pb.Tool):
        return t
    if not isinstance(t, Mapping):
        raise TypeError(f"a tool must be a mapping ({{'type': 'function', 'function': {{...}}}}), got {t!r}")
    fn = t.get("function", t)
    parameters = fn.get("parameters")
    return pb.Tool(name=str(fn.get("name", "")), description=str(fn.get("description") or ""),
                   parameters="" if parameters is None else parameters if isinstance(parameters, str)
                   else json.dumps(parameters))


def chat_input(messages: Sequence[Message], add_generation_prompt: bool | None, tools: Sequence[ToolSpec] | None = None,
               tool_choice: ToolChoice | None = None, parallel_tool_calls: bool | None = None) -> pb.ChatInput:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of chat messages, got {type(messages).__name__}")
    out = pb.ChatInput(messages=[chat_message(m) for m in messages], tools=[tool(t) for t in tools or ()])
    if add_generation_prompt is not None:
        out.add_generation_prompt = bool(add_generation_prompt)
    if isinstance(tool_choice, str):
        out.tool_choice_mode = tool_choice
    elif isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or tool_choice).get("name")
        if not isinstance(name, str):
            raise TypeError(f"tool_choice must name a function ({{'type': 'function', 'function': {{'name': ...}}}}), "
                            f"got {tool_choice!r}")
        out.tool_choice_function = name
    elif tool_choice is not None:
        raise TypeError(f"tool_choice must be 'auto', 'none', 'required' or a function, got {tool_choice!r}")
    if parallel_tool_calls is not None:
        out.parallel_tool_calls = bool(parallel_tool_calls)
    return out


def split_prompt(prompt: Prompt | None, text: str | None, messages: Sequence[Message] | None,
                 token_ids: Sequence[int] | None, *, allow_token_ids: bool = True):
    """(kind, value) with kind in {"text", "messages", "token_ids"}; exactly one input must be given."""
    given = [(k, v) for k, v in (("text", text), ("messages", messages), ("token_ids", token_ids)) if v is not None]
    if prompt is not None:
        if isinstance(prompt, str):
            given.append(("text", prompt))
        elif isinstance(prompt, Sequence) and prompt and all(
                isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            given.append(("token_ids", prompt))
        elif isinstance(prompt, Sequence) and prompt:
            given.append(("messages", prompt))
        else:
            raise TypeError("prompt must be a str, a non-empty list of token ids, or a non-empty list of "
                            f"chat messages; got {prompt!r}")
    if len(given) != 1:
        raise TypeError("give exactly one input: text, messages" + (" or token_ids" if allow_token_ids else "")
                        + (f" (got {', '.join(k for k, _ in given)})" if given else ""))
    kind, value = given[0]
    if kind == "token_ids" and not allow_token_ids:
        raise TypeError("token_ids is not an input of this call")
    return kind, value


def build_generate_request(prompt: Prompt | None = None, *, text: str | None = None,
                           messages: Sequence[Message] | None = None, token_ids: Sequence[int] | None = None,
                           add_generation_prompt: bool | None = None, request_id: str | None = None,
                           tools: Sequence[ToolSpec] | None = None, tool_choice: ToolChoice | None = None,
                           parallel_tool_calls: bool | None = None, **params: Any) -> pb.GenerateRequest:
    kind, value = split_prompt(prompt, text, messages, token_ids)
    req = pb.GenerateRequest(parameters=build_parameters(**params))
    if kind == "text":
        req.text = value
    elif kind == "messages":
        req.chat.CopyFrom(chat_input(value, add_generation_prompt, tools, tool_choice, parallel_tool_calls))
    else:
        req.token_ids.ids.extend(_ints("token_ids", value))
    if add_generation_prompt is not None and kind != "messages":
        raise TypeError("add_generation_prompt applies to chat messages only")
    if (tools, tool_choice, parallel_tool_calls) != (None, None, None) and kind != "messages":
        raise TypeError("tools, tool_choice and parallel_tool_calls apply to chat messages only")
    if request_id:
        req.request_id = request_id
    return req


def build_tokenize_request(prompt: str | Sequence[Message] | None = None, *, text: str | None = None,
                           messages: Sequence[Message] | None = None,
                           add_generation_prompt: bool | None = None) -> pb.TokenizeRequest:
    kind, value = split_prompt(prompt, text, messages, None, allow_token_ids=False)
    req = pb.TokenizeRequest()
    if kind == "text":
        req.text = value
    else:
        req.chat.CopyFrom(chat_input(value, add_generation_prompt))
    if add_generation_prompt is not None and kind != "messages":
        raise TypeError("add_generation_prompt applies to chat messages only")
    return req


PoolingInputs = Union[str, Sequence[int], Sequence[str], Sequence[Sequence[int]]]


def pooling_inputs(inputs: PoolingInputs) -> list[pb.PoolingInput]:
    """One text, one list of token ids, or a list of either: as the pooling RPCs' `inputs`."""
    if isinstance(inputs, str) or (isinstance(inputs, Sequence) and inputs
                                   and all(isinstance(x, int) and not isinstance(x, bool) for x in inputs)):
        inputs = [inputs]
    out = []
    for x in inputs:
        if isinstance(x, str):
            out.append(pb.PoolingInput(text=x))
        elif isinstance(x, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            out.append(pb.PoolingInput(token_ids=pb.TokenIds(ids=x)))
        else:
            raise TypeError(f"each input must be a str or a list of token ids, got {x!r}")
    return out


def build_embed_request(inputs: PoolingInputs, *, pooling: str | None = None, normalize: bool | None = None,
                        dimensions: int | None = None, request_id: str | None = None) -> pb.EmbedRequest:
    req = pb.EmbedRequest(inputs=pooling_inputs(inputs), request_id=request_id or "", pooling=pooling or "")
    if normalize is not None:
        req.normalize = normalize
    if dimensions is not None:
        req.dimensions = dimensions
    return req


def build_qa_request(inputs: PoolingInputs, *, max_answer_tokens: int | None = None,
                     request_id: str | None = None) -> pb.QARequest:
    req = pb.QARequest(inputs=pooling_inputs(inputs), request_id=request_id or "")
    if max_answer_tokens is not None:
        req.max_answer_tokens = max_answer_tokens
    return req
