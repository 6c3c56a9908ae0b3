"""Structured outputs through both APIs on a tiny random-weight checkpoint: nothing but the constraint makes
the output valid, so every output parsing and validating is the constraint's doing. One server (TP=1, HTTP on)."""

import asyncio
import json
import re
import urllib.request

import grpc
import jsonschema
import openai
import pytest
import xgrammar as xgr

from qwen2_client import AsyncClient
from qwen2_client.proto import serving_pb2 as pb
from qwen2_client.proto import serving_pb2_grpc as pb_grpc
from router import tool_calls
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.server_process import InProcessServer

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {"type": "object",
                     "properties": {"name": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                     "required": ["name", "age"], "additionalProperties": False},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["user", "tags"], "additionalProperties": False,
    },
    "enums_and_bools": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["red", "green", 3, None]},
                       "level": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["ok", "kind", "level"], "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2,
              "maxItems": 4},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                 "note": {"enum": ["x", "y"]}},
                "required": ["code"], "additionalProperties": False},
}
REGEX = r"[a-z]{3}-[0-9]{2,4}"
CHOICES = ["yes", "no", "maybe so", 'say "hi"']
GRAMMAR = 'root ::= "(" digit ("+" digit){0,3} ")"\ndigit ::= [0-9]'
GRAMMAR_RE = r"\([0-9](\+[0-9]){0,3}\)"
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset_config("tiny"), seed=3)
    s = InProcessServer(model_dir, tp=1, http=True, max_num_seqs=16)
    s.model_dir = model_dir
    yield s
    s.stop()


def requests_post(server, path: str, body: dict) -> dict:
    request = urllib.request.Request(server.http_url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def completions(client, prompt="Answer:", **extra):
    return client.completions.create(model="test", prompt=prompt, **{"max_tokens": MAX_TOKENS} | extra)


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_outputs_validate_greedy_and_sampled(client, grpc_client, name):
    schema = SCHEMAS[name]
    outs = []
    greedy = client.chat.completions.create(
        model="test", messages=[{"role": "user", "content": "Give me JSON."}], max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
    outs += [c.message.content for c in greedy.choices]
    sampled = completions(client, temperature=1.0, n=4, seed=7,
                          extra_body={"structured_outputs": {"json": schema}})
    outs += [c.text for c in sampled.choices]
    assert {c.finish_reason for c in greedy.choices + sampled.choices} == {"stop"}
    r = grpc_client.generate("JSON:", max_new_tokens=MAX_TOKENS, temperature=0.8, seed=1, json_schema=schema)
    outs.append(r.text)
    for text in outs:
        jsonschema.validate(json.loads(text), schema)


def test_json_object(client):
    """Any JSON object: random weights rarely close one (free-form strings), so an output cut by max_tokens must
    be a prefix of a JSON object (the grammar accepts it so far), a finished one must parse."""
    r = client.chat.completions.create(model="test", messages=[{"role": "user", "content": "JSON"}], n=4, seed=2,
                                       temperature=0, max_tokens=60, response_format={"type": "json_object"})
    for c in r.choices:
        text = c.message.content
        if c.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_builtin_json_grammar())
            assert text.startswith("{") and matcher.accept_string(text), text


def test_regex_choice_and_grammar(client, grpc_client):
    for extra, pattern in (({"regex": REGEX}, REGEX), ({"grammar": GRAMMAR}, GRAMMAR_RE)):
        for temperature in (0, 1.0):
            r = completions(client, temperature=temperature, n=3, seed=5, extra_body={"structured_outputs": extra})
            for c in r.choices:
                assert re.fullmatch(pattern, c.text), c.text
    r = completions(client, temperature=1.0, n=8, seed=3, extra_body={"structured_outputs": {"choice": CHOICES}})
    assert all(c.text in CHOICES for c in r.choices)
    assert grpc_client.generate("?", max_new_tokens=20, choice=CHOICES).text in CHOICES
    assert re.fullmatch(REGEX, grpc_client.generate("?", max_new_tokens=20, temperature=1.0, regex=REGEX).text)


def test_streamed_constrained_output(client):
    stream = completions(client, temperature=1.0, seed=4, stream=True,
                         extra_body={"structured_outputs": {"json": SCHEMAS["nested"]}})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMAS["nested"])


def test_unconstrained_tokens_unchanged_beside_constrained(server):
    """A greedy unconstrained request gives the same tokens alone and in a batch of constrained ones, and the
    constrained ones carry the only masks."""

    async def run():
        async with AsyncClient(server.target) as c:
            alone = await c.generate("The weather today", max_new_tokens=24, temperature=0, ignore_eos=True)
            constrained = [c.generate("JSON", max_new_tokens=MAX_TOKENS, temperature=1.0, seed=i,
                                      json_schema=SCHEMAS["nested"]) for i in range(6)]
            mixed = await asyncio.gather(c.generate("The weather today", max_new_tokens=24, temperature=0,
                                                    ignore_eos=True), *constrained)
            return alone, mixed

    alone, mixed = asyncio.run(run())
    assert mixed[0].token_ids == alone.token_ids
    for r in mixed[1:]:
        jsonschema.validate(json.loads(r.text), SCHEMAS["nested"])


BAD = [
    ({"json": {"type": "foo"}}, "structured_outputs.json", "not a valid JSON schema"),
    ({"json": "{not json"}, "structured_outputs.json", "not valid JSON"),
    ({"regex": "a(b"}, "structured_outputs.regex", "does not compile"),
    ({"grammar": "root ::= foo"}, "structured_outputs.grammar", "does not compile"),
    ({"choice": []}, "structured_outputs.choice", "non-empty list"),
    ({"regex": "a", "choice": ["b"]}, "structured_outputs.choice", "only one constraint"),
    ({"json": {"type": "object", "description": "x" * 70_000}}, "structured_outputs.json", "at most 64000"),
]


@pytest.mark.parametrize("extra,param,message", BAD)
def test_bad_constraints_are_400_naming_the_field(client, extra, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        completions(client, extra_body={"structured_outputs": extra})
    assert e.value.body["param"] == param
    assert message in e.value.body["message"]


def test_bad_response_format_and_grpc_errors(client, grpc_client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="test", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "object", "required": "a"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "not a valid JSON schema at required" in e.value.body["message"]
    with pytest.raises(Exception) as e:
        grpc_client.generate("x", regex="[a-")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.regex" in str(e.value) and "does not compile" in str(e.value)


# -- tool calling ---------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string",
                                                                                "pattern": "^[a-z]{1,10}$"}},
                                     "required": ["query"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def test_parse_hand_written_assistant_message():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
            '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"query": "a \\"}</tool_call>\\" b"}}\n</tool_call>')
    content, calls = tool_calls.parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "days": 2}),
                                                                   ("search", {"query": 'a "}</tool_call>" b'})]
    assert calls[0].arguments == '{"city": "Oslo", "days": 2}'  # as the model wrote it
    assert [c.name for c in tool_calls.parse(text, max_calls=1)[1]] == ["get_weather"]
    assert tool_calls.parse(text, max_calls=1)[0] == "Let me check."  # the dropped call is no content either
    unknown = tool_calls.parse(text, names={"search"})  # a block naming no tool of the request is content
    assert [c.name for c in unknown[1]] == ["search"] and unknown[0].startswith("Let me check.\n<tool_call>\n")
    malformed = 'Hi <tool_call>\n{"name": get_weather}\n</tool_call> there'
    assert tool_calls.parse(malformed) == (malformed, [])
    for text in (text, malformed, "plain <tool", 'x <tool_call>{"name": "a", "arguments": {"b": [1, '):
        for step in (1, 3, 7):  # any split of the stream gives the same content and calls, and no tags
            stream, content, calls = tool_calls.ToolCallStream(), "", {}
            for i in range(0, len(text), step):
                delta, deltas = stream.feed(text[i:i + step])
                content += delta
                for d in deltas:
                    if d.index not in calls:
                        assert d.id and d.name and d.arguments == ""
                        calls[d.index] = [d.name, ""]
                    else:
                        calls[d.index][1] += d.arguments
            content += stream.finish()
            whole_content, whole_calls = tool_calls.parse(text)
            assert list(calls.values()) == [[c.name, c.arguments] for c in whole_calls]
            assert content.strip() == whole_content.strip()
            if calls:
                assert "<tool_call>" not in content


def check_calls(calls, allowed):
    assert calls
    for call in calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


@pytest.mark.parametrize("tool_choice,allowed", [
    ("required", {"get_weather", "search"}),
    ({"type": "function", "function": {"name": "search"}}, {"search"}),
])
def test_required_and_named_tool_choice_with_parallel_tool_calls_false(client, tool_choice, allowed):
    """The grammar allows one call, then only the end."""
    r = client.chat.completions.create(model="test", messages=ASK, tools=TOOLS, tool_choice=tool_choice, n=4,
                                       temperature=1.0, seed=9, max_tokens=MAX_TOKENS, parallel_tool_calls=False)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and not c.message.content and len(c.message.tool_calls) == 1
        check_calls(c.message.tool_calls, allowed)


def streamed_chat(client, **kw):
    """(content, calls, finish, fragments per call) of a streamed chat completion, its deltas accumulated as an
    OpenAI client does; each call's first delta must carry its id, type and name, and no arguments."""
    content, calls, fragments, finish = "", {}, {}, None
    for chunk in client.chat.completions.create(model="test", stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index], fragments[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}, 0
            else:
                assert d.id is None and d.function.name is None and d.function.arguments
                calls[d.index]["arguments"] += d.function.arguments
                fragments[d.index] += 1
        finish = chunk.choices[0].finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[i] for i in sorted(calls)], finish, [fragments[i] for i in sorted(fragments)]


def assert_stream_adds_up(client, **kw):
    """The streamed calls are exactly the non-streamed ones (seeded: the same tokens), in several fragments."""
    whole = client.chat.completions.create(model="test", **kw).choices[0]
    content, calls, finish, fragments = streamed_chat(client, **kw)
    assert finish == whole.finish_reason == "tool_calls"
    assert "<tool_call>" not in content and content.strip() == (whole.message.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments)
                                                            for c in whole.message.tool_calls]
    assert all(n > 1 for n in fragments), fragments  # arguments stream as the model writes them
    return whole.message.tool_calls


def test_streamed_tool_calls_add_up_to_the_non_streamed(client):
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        calls = assert_stream_adds_up(client, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=1.0,
                                      seed=10, max_tokens=400)
        check_calls(calls, {"get_weather", "search"})
    # Several calls in one answer, with `auto`: a grammar makes the random model write two Qwen blocks.
    calls = assert_stream_adds_up(client, messages=ASK, tools=TOOLS, temperature=1.0, seed=3, max_tokens=MAX_TOKENS,
                                  extra_body={"structured_outputs": {"grammar": TWO_CALLS}})
    assert [c.function.name for c in calls] == ["search", "get_weather"]
    check_calls(calls, {"get_weather", "search"})


# Qwen's format, twice: what a model calling two tools at once writes.
TWO_CALLS = r"""root ::= "Checking.\n" search "\n" weather
search ::= "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"" [a-z]{3,9} "\"}}\n</tool_call>"
weather ::= "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" ("Oslo" | "Lima") "\", \"days\": " [1-7] "}}\n</tool_call>"
"""


def test_parallel_tool_calls_false_with_auto_parses_the_first_call_only(client):
    kw = dict(messages=ASK, tools=TOOLS, temperature=1.0, seed=3, max_tokens=MAX_TOKENS, parallel_tool_calls=False,
              extra_body={"structured_outputs": {"grammar": TWO_CALLS}})
    calls = assert_stream_adds_up(client, **kw)  # auto: only the first block is parsed; the second is dropped
    assert [c.function.name for c in calls] == ["search"]
    assert client.chat.completions.create(model="test", **kw).choices[0].message.content == "Checking."


def test_min_tokens_with_a_grammar_the_grammar_end_wins(client, grpc_client):
    """While min_tokens bans the ends, a grammar that allows only its end still ends (not a row of -inf logits:
    NaN, a token outside the grammar); where the grammar may go on, min_tokens holds. EOS is pushed up by
    logit_bias, so without min_tokens every output would end as soon as the grammar allows."""
    eos = {str(t): 100 for t in grpc_client.model_info().eos_token_ids}
    r = completions(client, max_tokens=30, logit_bias=eos, n=3, temperature=1.0, seed=1,
                    extra_body={"min_tokens": 12, "structured_outputs": {"choice": ["yes", "no"]}})
    for c in r.choices:
        assert c.text in ("yes", "no") and c.finish_reason == "stop"
    assert r.usage.completion_tokens < 3 * 12
    for min_tokens in (0, 7):
        r = completions(client, max_tokens=30, logit_bias=eos, temperature=1.0, seed=2,
                        extra_body={"min_tokens": min_tokens, "structured_outputs": {"regex": "[a-z]{1,60}"}})
        assert re.fullmatch("[a-z]{1,60}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == (2 if min_tokens == 0 else min_tokens + 1)  # the text, then EOS


def test_tool_calling_over_grpc(server):
    """Generate's calls; GenerateStream's deltas (name first, then argument fragments) add up to exactly them, and
    its tool_calls field still brings each call once it is whole."""
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="Weather?")], tool_choice_mode="required",
                        tools=[pb.Tool(name=t["function"]["name"], parameters=json.dumps(t["function"]["parameters"]))
                               for t in TOOLS])
    request = pb.GenerateRequest(chat=chat, parameters=pb.GenerationParameters(max_new_tokens=400,
                                                                               temperature=1.0, seed=3))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        r = stub.Generate(request, timeout=120)
        assert r.final.finish_reason == pb.FINISH_REASON_TOOL_CALLS and not r.text.strip() and r.tool_calls
        for call in r.tool_calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMA_OF[call.name])
        parts = list(stub.GenerateStream(request, timeout=120))  # seeded: the same tokens
        calls, fragments = {}, {}
        for d in (d for p in parts for d in p.tool_call_deltas):
            if d.index not in calls:
                assert d.id and d.name and not d.arguments
                calls[d.index], fragments[d.index] = [d.name, ""], 0
            else:
                assert not d.id and not d.name
                calls[d.index][1] += d.arguments
                fragments[d.index] += 1
        assert list(calls.values()) == [[c.name, c.arguments] for c in r.tool_calls]
        assert all(n > 1 for n in fragments.values())
        assert [(c.name, c.arguments) for p in parts for c in p.tool_calls] == [(c.name, c.arguments)
                                                                                for c in r.tool_calls]
        assert "<tool_call>" not in "".join(p.text for p in parts)
        request.chat.parallel_tool_calls = False
        assert len(stub.Generate(request, timeout=120).tool_calls) == 1
        request.chat.tool_choice_function = "nope"  # the oneof: replaces tool_choice_mode
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat.tool_choice_function" in e.value.details()


def test_history_renders_as_transformers_does(server):
    from transformers import AutoTokenizer

    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "snow"}'},
    ]
    r = requests_post(server, "/tokenize", {"messages": history, "tools": TOOLS})
    reference = [dict(m) for m in history]
    reference[1]["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]  # templates read an object
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    expected = tokenizer.apply_chat_template(reference, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in expected and "<tool_response>" in expected
    assert r["tokens"] == tokenizer.encode(expected)


def test_auto_parses_what_the_model_wrote_and_bad_tools_are_refused(client):
    r = client.chat.completions.create(model="test", messages=ASK, tools=TOOLS, max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")  # random weights: text, most likely
    for bad, param in (({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                        "tool_choice"),
                       ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
                        "tools[0].function.parameters"),
                       ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
                        "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="test", messages=ASK, max_tokens=4, **bad)
        assert e.value.body["param"] == param, e.value.body


# -- preemption, pipeline parallelism, n > 1 and recovery -------------------------------------------------------
def test_constrained_outputs_under_preemption_pp2_n_and_a_rebuild(server):
    """PP=2 and a KV cache far too small for the batch: n=6 constrained choices are preempted and recomputed, and
    the engine is rebuilt once mid-generation (every sequence recomputed from its tokens). Each matcher follows
    its tokens, so every output still validates."""
    pp = InProcessServer(server.model_dir, tp=1, engine_options={"pp": 2, "max_num_blocks": 32}, http=True,
                         max_num_seqs=8)
    try:
        runner = pp.runner
        registry = runner.metrics.registry
        complete, calls = runner.scheduler.complete, [0]

        def faulty(plans, results):  # once, some steps in: as Scheduler.complete does on results it cannot apply
            calls[0] += 1
            if calls[0] == 25:
                raise ValueError("injected fault in the result path")
            return complete(plans, results)

        runner.scheduler.complete = faulty
        with openai.OpenAI(base_url=pp.http_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
            r = c.completions.create(model="test", prompt="JSON:", max_tokens=100, n=6, temperature=1.0, seed=21,
                                     extra_body={"structured_outputs": {"json": SCHEMAS["nested"]}})
        assert calls[0] > 25
        assert registry.get_sample_value("qwen2_preemptions_total") > 0
        assert registry.get_sample_value("qwen2_engine_failures_total", {"cause": "internal"}) == 1
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.text), SCHEMAS["nested"])
    finally:
        pp.stop()


# -- the SDK and its CLI --------------------------------------------------------------------------------------
def test_sdk_tool_calls_history_and_cli(server, grpc_client, tmp_path, capsys):
    from qwen2_client import cli

    kw = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0,
              seed=5, max_new_tokens=400)
    whole = grpc_client.chat(ASK, **kw)
    assert whole.finish_reason == "tool_calls" and whole.tool_calls and not whole.text.strip()
    for call in whole.tool_calls:
        assert call.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.arguments), SCHEMA_OF["get_weather"])
    streamed = grpc_client.generate_stream(messages=ASK, **kw).collect()  # from the argument deltas
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    one = asyncio.run(_async_chat(server.target, ASK, parallel_tool_calls=False, tool_choice="required",
                                  **{k: v for k, v in kw.items() if k != "tool_choice"}))
    assert len(one.tool_calls) == 1
    # The history (the SDK's calls, then the tool's answer) renders as transformers renders it.
    from transformers import AutoTokenizer

    history = ASK + [{"role": "assistant", "content": None, "tool_calls": whole.tool_calls[:1]},
                     {"role": "tool", "tool_call_id": whole.tool_calls[0].id, "content": '{"forecast": "snow"}'}]
    reference = ASK + [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": json.loads(whole.tool_calls[0].arguments)}}]}, history[-1]]
    expected = AutoTokenizer.from_pretrained(server.model_dir).apply_chat_template(
        reference, tokenize=False, add_generation_prompt=True)
    assert grpc_client.tokenize(messages=history).rendered == expected
    # The CLI: a constraint flag, and tools from a file with the calls printed as JSON lines.
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    assert cli.main(["generate", "Code:", "--target", server.target, "--regex", REGEX, "--max-new-tokens", "20"]) == 0
    assert re.fullmatch(REGEX, capsys.readouterr().out.strip())
    assert cli.main(["chat", json.dumps(ASK), "--target", server.target, "--tools", f"@{tmp_path / 'tools.json'}",
                     "--tool-choice", "search", "--no-parallel-tool-calls", "--temperature", "1", "--seed", "2",
                     "--max-new-tokens", "200", "--stream"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    call = json.loads(lines[-1])
    assert len(lines) == 1 and call["name"] == "search"
    jsonschema.validate(json.loads(call["arguments"]), SCHEMA_OF["search"])


async def _async_chat(target, messages, **kw):
    async with AsyncClient(target) as c:
        return await c.chat(messages, **kw)
