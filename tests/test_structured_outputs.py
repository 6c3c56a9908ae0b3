"""Structured outputs through both APIs on a tiny random-weight checkpoint: nothing but the constraint makes
the output valid, so every output parsing and validating is the constraint's doing. One server (TP=1, HTTP on)."""

import asyncio
import json
import re

import grpc
import jsonschema
import openai
import pytest
import xgrammar as xgr

from qwen2_client import AsyncClient, Client
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
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.target) as c:
        yield c


def completions(client, prompt="Answer:", **extra):
    return client.completions.create(model="test", prompt=prompt, max_tokens=MAX_TOKENS, **extra)


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
