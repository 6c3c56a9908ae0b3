"""Request validation: every field checked against the model and the server's limits.

Each violation names the field, the value and the bound (TGI's messages are the bar), and all of a
request's violations are reported together, as `google.rpc.BadRequest` field violations.
"""

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from shards.sampling import SamplingParams


class RequestError(ValueError):
    """An invalid request: (field, description) pairs, all of them."""

    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = violations
        super().__init__("; ".join(description for _, description in violations))


class UnsupportedTask(RequestError):
    """A task the served checkpoint has no head for (generation from a classifier, say): FAILED_PRECONDITION /
    400, since the request is fine and the server is not the one for it."""


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_new_tokens: int = 4096  # the most any request may ask for
    default_max_new_tokens: int = 256  # when neither the request nor generation_config.json says
    max_stop_sequences: int = 16
    max_stop_length: int = 256  # characters per stop string
    max_logprobs: int = 20
    max_logit_bias: int = 300  # entries of logit_bias
    max_input_chars: int = 4_000_000
    max_constraint_chars: int = 64_000  # a JSON schema, regex, grammar or the choices (as JSON) at most
    max_pooling_inputs: int = 256  # texts (or token id lists) one pooling request may carry


@dataclass(frozen=True)
class Defaults:
    """The model's own sampling defaults (generation_config.json), used for every unset field."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None

    @classmethod
    def from_pretrained(cls, model_dir) -> "Defaults":
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        g = json.loads(path.read_text())
        sampling = g.get("do_sample", False)  # transformers: without do_sample the knobs are ignored (greedy)
        return cls(
            temperature=float(g.get("temperature", 1.0)) if sampling else 0.0,
            top_k=int(g.get("top_k", 0) or 0) if sampling else 0,
            top_p=float(g.get("top_p", 1.0)) if sampling else 1.0,
            min_p=float(g.get("min_p", 0.0) or 0.0) if sampling else 0.0,
            repetition_penalty=float(g.get("repetition_penalty", 1.0)),
            max_new_tokens=g.get("max_new_tokens"),
        )


# At most one a request; tool_call comes from validate_tools (tool_choice required or named), already checked.
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_call")
MAX_TOOLS = 128


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (router/structured.py compiles it). `source`: the schema's JSON, the
    regex, the EBNF, the choices as a JSON list, or (tool_call) {"tools": the allowed tools as a list of
    {"name", "parameters"}, "parallel": more than one call allowed}; `field` is where it sits in the request, which its errors name."""

    kind: str  # one of CONSTRAINTS, or tool_call
    source: str
    field: str

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source


POOLING_TASKS = ("embed", "classify", "token_classify", "qa")


@dataclass(frozen=True)
class PoolingSpec:
    """What a pooling request asks (router/pooling.py runs it). Embeddings: `pooling` "last" (the last token's
    hidden state) or "mean", the first `dimensions` of it (Matryoshka; None: all), then L2-normalised if asked."""

    task: str  # one of POOLING_TASKS
    pooling: str = "last"
    normalize: bool = True
    dimensions: int | None = None


def validate_pooling(task: str, hidden_size: int, pooling: str | None = None, normalize: bool | None = None,
                     dimensions: int | None = None, names: Mapping[str, str] = {}) -> PoolingSpec:
    """The embedding options (ignored by the other tasks); `names` maps pooling, normalize and dimensions to
    the API's field names. Whether the checkpoint serves `task` is the serving core's to say."""
    if task not in POOLING_TASKS:
        raise RequestError([(names.get("task", "task"), f"`{names.get('task', 'task')}` must be one of "
                                                        f"{list(POOLING_TASKS)}, got {task!r}")])
    bad = []
    if pooling not in (None, "last", "mean"):
        name = names.get("pooling", "pooling")
        bad.append((name, f"`{name}` must be 'last' or 'mean', got {pooling!r}"))
    if dimensions is not None and not 1 <= dimensions <= hidden_size:
        name = names.get("dimensions", "dimensions")
        bad.append((name, f"`{name}` must be >= 1 and <= the hidden size {hidden_size}, got {dimensions}"))
    if bad:
        raise RequestError(bad)
    return PoolingSpec(task, pooling or "last", True if normalize is None else normalize, dimensions)


def validate_pooling_prompt(prompt_len: int, limits: Limits, field_name: str) -> None:
    """A pooling input is computed whole: at least one token, at most max_model_len."""
    if prompt_len == 0:
        raise RequestError([(field_name, f"`{field_name}` is empty once tokenized: it must have at least one token")])
    if prompt_len > limits.max_model_len:
        raise RequestError([(field_name, f"`{field_name}` has {prompt_len} tokens; it must have at most the maximum "
                                         f"model length {limits.max_model_len}")])


@dataclass
class ValidRequest:
    max_new_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # in the text (token ids are always all there)
    include_stop_str_in_output: bool = False  # the matched stop string, or the stop/EOS token's text
    cache_salt: str = ""  # prefix-cache isolation: only requests with the same salt share cached blocks
    constraint: Constraint | None = None
    pooling: PoolingSpec | None = None  # a pooling request: its prompt is computed, nothing generated


def validate_parameters(given: Mapping[str, Any], prompt_len: int, defaults: Defaults, limits: Limits,
                        prefix: str = "parameters.", names: Mapping[str, str] = {}) -> ValidRequest:
    """The request's sampling and stopping fields -> what the scheduler needs, or RequestError listing every
    violation. `given` holds only the fields the client set (by their gRPC names); each API names a field in
    its own words: `names` maps a gRPC name to the API's (HTTP says `max_tokens` for `max_new_tokens`), and
    `prefix` is where the fields sit in the request body."""
    bad: list[tuple[str, str]] = []

    def wire(name: str) -> str:
        return names.get(name, name)

    def check(name: str, value, ok: bool, bound: str):
        if not ok:
            bad.append((prefix + wire(name), f"`{wire(name)}` must be {bound}, got {value!r}"))

    def number(name: str, default, ok, bound: str):
        value = given.get(name)
        if value is None:
            return default
        check(name, value, math.isfinite(value) and ok(value), bound)
        return value

    temperature = number("temperature", defaults.temperature, lambda v: 0.0 <= v <= 100.0, ">= 0.0 and <= 100.0")
    top_p = number("top_p", defaults.top_p, lambda v: 0.0 < v <= 1.0, "> 0.0 and <= 1.0")
    min_p = number("min_p", defaults.min_p, lambda v: 0.0 <= v <= 1.0, ">= 0.0 and <= 1.0")
    repetition = number("repetition_penalty", defaults.repetition_penalty, lambda v: 0.0 < v <= 10.0,
                        "> 0.0 and <= 10.0")
    presence = number("presence_penalty", 0.0, lambda v: -2.0 <= v <= 2.0, ">= -2.0 and <= 2.0")
    frequency = number("frequency_penalty", 0.0, lambda v: -2.0 <= v <= 2.0, ">= -2.0 and <= 2.0")
    top_k = given.get("top_k")
    top_k = defaults.top_k if top_k is None else top_k
    check("top_k", top_k, 0 <= top_k <= limits.vocab_size,
          f">= 0 and <= the vocabulary size {limits.vocab_size} (0 = off)")
    logprobs = given.get("logprobs") or 0
    check("logprobs", logprobs, 0 <= logprobs <= limits.max_logprobs, f">= 0 and <= {limits.max_logprobs}")
    prompt_logprobs = given.get("prompt_logprobs")  # None: not asked
    if prompt_logprobs is not None:
        check("prompt_logprobs", prompt_logprobs, 0 <= prompt_logprobs <= limits.max_logprobs,
              f">= 0 and <= {limits.max_logprobs}")

    room = limits.max_model_len - prompt_len
    asked = given.get("max_new_tokens")
    if asked is None:
        max_new = min(defaults.max_new_tokens or limits.default_max_new_tokens, limits.max_new_tokens, max(room, 0))
    else:
        max_new = asked
        # 0 only for the prompt's logprobs alone (OpenAI's echo with max_tokens 0)
        low = 0 if prompt_logprobs is not None else 1
        check("max_new_tokens", asked, low <= asked <= limits.max_new_tokens, f">= {low} and <= "
              f"{limits.max_new_tokens}" + ("" if low == 0 else f" (0 only with `{wire('prompt_logprobs')}`)"))
        if 1 <= asked <= limits.max_new_tokens and asked > room:
            bad.append((prefix + wire("max_new_tokens"),
                        f"prompt ({prompt_len} tokens) + `{wire('max_new_tokens')}` ({asked}) must be <= the "
                        f"maximum model length {limits.max_model_len}"))
    min_tokens = given.get("min_tokens") or 0
    check("min_tokens", min_tokens, 0 <= min_tokens <= max_new, f">= 0 and <= `{wire('max_new_tokens')}` ({max_new})")
    if prompt_len == 0:  # a text or chat that renders and tokenizes to nothing (an unknown role, say)
        bad.append(("input", "the prompt is empty once rendered and tokenized: it must have at least one token"))
    if room < (0 if asked == 0 else 1):  # asked 0: the prompt alone
        need = "fit" if asked == 0 else "leave room for at least one new token"
        bad.append(("input", f"the prompt has {prompt_len} tokens; it must {need} within the maximum model length "
                             f"{limits.max_model_len}"))

    stop = list(given.get("stop", ()))
    check("stop", f"{len(stop)} strings", len(stop) <= limits.max_stop_sequences,
          f"at most {limits.max_stop_sequences} strings")
    for i, s in enumerate(stop):
        if not 1 <= len(s) <= limits.max_stop_length:
            bad.append((f"{prefix}{wire('stop')}[{i}]",
                        f"`{wire('stop')}[{i}]` must be 1 to {limits.max_stop_length} characters, got {len(s)}"))
    stop_ids = list(given.get("stop_token_ids", ()))
    check("stop_token_ids", f"{len(stop_ids)} ids", len(stop_ids) <= limits.max_stop_sequences,
          f"at most {limits.max_stop_sequences} ids")
    for i, t in enumerate(stop_ids):
        if not 0 <= t < limits.vocab_size:
            bad.append((f"{prefix}{wire('stop_token_ids')}[{i}]",
                        f"`{wire('stop_token_ids')}[{i}]` must be >= 0 and < the vocabulary size {limits.vocab_size}, "
                        f"got {t}"))
    logit_bias = _logit_bias(given.get("logit_bias") or {}, limits, prefix, wire("logit_bias"), bad)
    cache_salt = given.get("cache_salt") or ""
    check("cache_salt", f"{len(cache_salt)} characters", len(cache_salt) <= limits.max_stop_length,
          f"at most {limits.max_stop_length} characters")
    constraint = _constraint(given, limits, prefix, wire, bad)
    if bad:
        raise RequestError(bad)
    seed = given.get("seed")
    return ValidRequest(
        max_new_tokens=max_new,
        sampling=SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition,
            presence_penalty=presence, frequency_penalty=frequency, seed=seed, logprobs=logprobs,
            logit_bias=logit_bias, min_tokens=min_tokens, prompt_logprobs=prompt_logprobs,
        ),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=bool(given.get("ignore_eos")),
        skip_special_tokens=bool(given.get("skip_special_tokens", True)),
        include_stop_str_in_output=bool(given.get("include_stop_str_in_output")),
        cache_salt=cache_salt,
        constraint=constraint,
    )


def _constraint(given: Mapping, limits: Limits, prefix: str, wire, bad: list) -> Constraint | None:
    """The one constraint set (json_object: true counts, false does not), its size bounded; a JSON schema must
    be one. Whether it compiles is router/structured.py's to say."""
    kinds = [k for k in CONSTRAINTS if given.get(k) not in (None, False)]
    if len(kinds) > 1:
        bad.append((prefix + wire(kinds[1]), f"only one constraint may be set, got {[wire(k) for k in kinds]}"))
    if len(kinds) != 1:
        return None
    kind, value = kinds[0], given[kinds[0]]
    name = wire(kind)
    if kind == "json_object":
        return Constraint(kind, "", prefix + name)
    if kind == "choice":
        value = list(value)
        if not value or not all(isinstance(c, str) and c for c in value):
            bad.append((prefix + name, f"`{name}` must be a non-empty list of non-empty strings"))
            return None
        value = json.dumps(value, ensure_ascii=False)
    elif kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    if kind == "tool_call":
        return Constraint(kind, value, prefix + name)
    if len(value) > limits.max_constraint_chars:
        bad.append((prefix + name, f"`{name}` must be at most {limits.max_constraint_chars} characters, got "
                                   f"{len(value)}"))
        return None
    if not value.strip():
        bad.append((prefix + name, f"`{name}` must not be empty"))
        return None
    if kind == "json_schema":
        problem = schema_problem(value)
        if problem:
            bad.append((prefix + name, f"`{name}` {problem}"))
            return None
    return Constraint(kind, value, prefix + name)


@dataclass(frozen=True)
class ValidTools:
    """A chat request's tools: what the template renders (None: no tools), whether the output is parsed for
    calls, and (tool_choice required or named) the tool_call constraint's source for validate_parameters."""

    template_tools: list[dict] | None = None
    parse: bool = False
    constraint: str | None = None
    names: tuple[str, ...] = ()  # the tools a parsed call may name
    max_calls: int | None = None  # parallel_tool_calls false: 1 (calls past it are dropped)


def validate_tools(tools: list | None, tool_choice, limits: Limits, names: Mapping[str, str] = {},
                   parallel: bool = True) -> ValidTools:
    """OpenAI's `tools` ({"type": "function", "function": {"name", "description", "parameters"}}) and
    `tool_choice` ("none", "auto", "required", or {"type": "function", "function": {"name"}}); `names` maps
    "tools" and "tool_choice" to the API's field names. Not `parallel` (parallel_tool_calls false): at most one
    call, by the grammar with required or named, by parsing only the first with auto."""
    tools_field, choice_field = names.get("tools", "tools"), names.get("tool_choice", "tool_choice")
    tools = tools or []
    bad: list[tuple[str, str]] = []
    if len(tools) > MAX_TOOLS:
        raise RequestError([(tools_field, f"`{tools_field}` may hold at most {MAX_TOOLS} tools, got {len(tools)}")])
    functions = {}
    for i, tool in enumerate(tools):
        where = f"{tools_field}[{i}]"
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
            bad.append((where, f"`{where}` must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                               f"{{...}}}}}}"))
            continue
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            bad.append((f"{where}.function.name", f"`{where}.function.name` must be 1 to 64 letters, digits, _, . or "
                                                  f"-, got {name!r}"))
            continue
        if name in functions:
            bad.append((f"{where}.function.name", f"`{where}.function.name` {name!r} is given twice"))
        parameters = fn.get("parameters")
        if parameters is not None:
            problem = schema_problem(json.dumps(parameters))
            if problem:
                bad.append((f"{where}.function.parameters", f"`{where}.function.parameters` {problem}"))
        functions[name] = parameters
    if bad:
        raise RequestError(bad)
    max_calls = None if parallel else 1
    if tool_choice is None or tool_choice == "auto":
        return ValidTools(tools or None, bool(tools), names=tuple(functions), max_calls=max_calls)
    if tool_choice == "none":
        return ValidTools()
    if tool_choice == "required":
        chosen = list(functions)
    elif (isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), Mapping)):
        chosen = [tool_choice["function"].get("name")]
    else:
        raise RequestError([(choice_field, f"`{choice_field}` must be 'none', 'auto', 'required' or {{'type': "
                                           f"'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")])
    missing = [n for n in chosen if n not in functions]
    if not chosen or missing:
        raise RequestError([(choice_field, f"`{choice_field}` needs `{tools_field}` to hold "
                                           f"{missing[0] if missing else 'a function'!r}; tools given: "
                                           f"{sorted(functions)}")])
    source = json.dumps({"tools": [{"name": n, "parameters": functions[n]} for n in chosen], "parallel": parallel})
    if len(source) > limits.max_constraint_chars:
        raise RequestError([(tools_field, f"the chosen tools' schemas must be at most {limits.max_constraint_chars} "
                                          f"characters of JSON, got {len(source)}")])
    return ValidTools(tools, True, source, tuple(chosen), max_calls)


def schema_problem(source: str) -> str | None:
    """Why this text is not a JSON schema (xgrammar accepts some nonsense silently), or None."""
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as e:
        return f"is not valid JSON: {e}"
    if not isinstance(schema, (dict, bool)):
        return f"must be a JSON object, got {type(schema).__name__}"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return f"is not a valid JSON schema at {where}: {e.message[:300]}"
    return None


def _logit_bias(bias: Mapping, limits: Limits, prefix: str, name: str, bad: list) -> tuple[tuple[int, float], ...]:
    """token id -> bias as (id, bias) pairs. Ids may be decimal strings (JSON object keys are)."""
    if len(bias) > limits.max_logit_bias:
        bad.append((prefix + name, f"`{name}` must have at most {limits.max_logit_bias} entries, got {len(bias)}"))
        return ()
    pairs = []
    for key, value in bias.items():
        token = int(key) if isinstance(key, int) or str(key).isdecimal() else None
        if token is None or not 0 <= token < limits.vocab_size:
            bad.append((f"{prefix}{name}[{key}]", f"`{name}` keys must be token ids >= 0 and < the vocabulary "
                                                  f"size {limits.vocab_size}, got {key!r}"))
        elif not (math.isfinite(value) and -100.0 <= value <= 100.0):
            bad.append((f"{prefix}{name}[{key}]", f"`{name}[{key}]` must be >= -100.0 and <= 100.0, got {value!r}"))
        else:
            pairs.append((token, float(value)))
    return tuple(pairs)


def validate_token_ids(ids, vocab_size: int, field_name: str = "token_ids.ids") -> list[int]:
    ids = list(ids)
    if not ids:
        raise RequestError([(field_name, f"`{field_name}` must not be empty")])
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size][:5]
    if bad:
        raise RequestError([(f"{field_name}[{i}]", f"`{field_name}[{i}]` must be >= 0 and < the vocabulary size "
                                                   f"{vocab_size}, got {t}") for i, t in bad])
    return ids
