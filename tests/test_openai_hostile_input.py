"""Hostile input over the OpenAI-compatible HTTP API: every request gets 200 or a 4xx with OpenAI's error object
(never a 5xx), and the server keeps serving, with every KV block free afterwards.

Bodies are built from the request models' own fields (router/openai_protocol.py), so a field added to either
body is fuzzed without touching this file: each field is left out, set to a plausible value, to an extreme, or
to a JSON value of any type. Raw bytes and broken JSON go to every route too.
"""

import collections
import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.openai_protocol import ChatCompletionRequest, CompletionRequest
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.server_process import InProcessServer

VOCAB = preset_config("tiny")["vocab_size"]
MAX_BODY, MAX_INPUT_CHARS, MAX_NEW_TOKENS = 2**18, 20_000, 16
ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/embeddings", "/classify",
          "/pooling"]


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset_config("tiny"), seed=5)
    s = InProcessServer(model_dir, tp=1, http=True, server_options={"max_message_bytes": MAX_BODY},
                        limits_options={"max_input_chars": MAX_INPUT_CHARS, "max_new_tokens": MAX_NEW_TOKENS},
                        max_num_seqs=8, max_num_batched_tokens=512, max_waiting=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def conn(server):
    c = http.client.HTTPConnection("127.0.0.1", server.server.http.port, timeout=120)
    yield c
    c.close()


def post(conn, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()
    except (http.client.HTTPException, OSError):  # the server closed a connection it refused a body on
        conn.close()
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()


def check(status: int, data: bytes, statuses: collections.Counter) -> None:
    """200, or a 4xx that is OpenAI's error object with a message; a stream has no error event past its 200."""
    statuses[status] += 1
    assert status == 200 or 400 <= status < 500, (status, data[:500])
    if status != 200:
        error = json.loads(data)["error"]
        assert error["message"] and error["type"] == "invalid_request_error" or status in (401, 429), error
    elif data.startswith(b"data: "):
        assert data.endswith(b"data: [DONE]\n\n") and b'"error"' not in data, data[-500:]


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4), max_leaves=12)
INTS = st.sampled_from([0, 1, -1, 2, MAX_NEW_TOKENS, MAX_NEW_TOKENS + 1, VOCAB - 1, VOCAB, 2**31, 2**63, 2**64,
                        -2**63, 10**30]) | st.integers(-5, 40)
FLOATS = st.sampled_from([0.0, -0.0, 1.0, 2.0, -2.0, 1e-45, 100.0, 1e308, -1e308]) | st.floats(-3, 3)
TEXT = st.text(max_size=40) | st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "{{ 7 * 7 }}", "\x00",
                                               "\ud7ff\ue000\U0010ffff", ""])
TOKEN_IDS = st.lists(st.sampled_from([0, 151_643, 151_646, VOCAB - 1, VOCAB, -1]) | st.integers(0, VOCAB - 1),
                     max_size=20)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bogus"])},
    optional={"content": TEXT | st.none() | st.lists(st.fixed_dictionaries(
                  {"type": st.sampled_from(["text", "image_url", "x"])}, optional={"text": TEXT | ANY_JSON}),
                  max_size=3) | ANY_JSON,
              "name": TEXT, "tool_call_id": TEXT, "tool_calls": st.lists(ANY_JSON, max_size=2)})
# Plausible values by field name; every field also gets extremes and any JSON at all.
PLAUSIBLE = {
    "model": st.sampled_from(["test", "other", ""]),
    "prompt": TEXT | st.lists(TEXT, max_size=3) | TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3),
    "messages": st.lists(MESSAGE, max_size=4) | st.lists(st.fixed_dictionaries(  # a valid turn, to get past it
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}), min_size=1, max_size=3),
    "stop": TEXT | st.lists(TEXT, max_size=20),
    "stop_token_ids": TOKEN_IDS,
    "logit_bias": st.dictionaries(st.sampled_from(["0", "42", str(VOCAB), "-1", "x", "1e3"]) | st.integers(
        0, VOCAB).map(str), FLOATS | st.sampled_from([100.0, -100.0, 101.0]), max_size=5),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | ANY_JSON}),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "messages", "x", "tools"]), ANY_JSON,
                                            max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | ANY_JSON,
    "tool_choice": st.sampled_from(["none", "auto"]) | ANY_JSON,
    "tools": st.lists(ANY_JSON, max_size=2),
}


def _by_type(annotation) -> st.SearchStrategy:
    text = str(annotation)
    if "bool" in text:
        return st.booleans()
    if "float" in text:
        return FLOATS
    if "int" in text:
        return INTS
    return TEXT


def bodies(model) -> st.SearchStrategy:
    """A body with its prompt or messages (mostly), a few of `model`'s other fields, and sometimes one it lacks."""
    fields = {name: st.one_of(PLAUSIBLE.get(name, _by_type(info.annotation)), ANY_JSON)
              for name, info in model.model_fields.items()}
    fields["max_tokens"] = st.integers(0, 4) | fields["max_tokens"]  # mostly short, to keep the run fast
    fields["n"] = st.integers(1, 3) | fields["n"]
    fields["unknown_field"] = ANY_JSON
    base = "prompt" if "prompt" in fields else "messages"
    others = sorted(set(fields) - {base})

    @st.composite
    def body(draw):
        out = {}
        if draw(st.integers(0, 4)):
            out[base] = draw(PLAUSIBLE[base] if draw(st.integers(0, 3)) else ANY_JSON)
        for name in draw(st.lists(st.sampled_from(others), max_size=draw(st.sampled_from([1, 2, 5, len(others)])),
                                  unique=True)):
            out[name] = draw(fields[name])
        return out

    return body()


@pytest.mark.parametrize("path,model,examples", [("/v1/completions", CompletionRequest, 250),
                                                  ("/v1/chat/completions", ChatCompletionRequest, 250)])
def test_random_request_bodies(conn, path, model, examples):
    statuses = collections.Counter()

    @fuzz(examples)
    @given(bodies(model))
    def send(body):
        data = json.dumps(body, allow_nan=True).encode()
        status, out = post(conn, path, data)
        check(status, out, statuses)

    send()
    assert statuses[200] >= 10 and sum(statuses.values()) - statuses[200] >= 10, statuses  # both reached


@pytest.mark.parametrize("path", ROUTES)
def test_random_bytes_and_broken_json(conn, path):
    statuses = collections.Counter()

    @fuzz(80)
    @given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
           | ANY_JSON.map(lambda v: json.dumps(v).encode()[:-1]), st.sampled_from(["application/json", "text/plain", ""]))
    def send(data, content_type):
        status, out = post(conn, path, data, content_type)
        check(status, out, statuses)

    send()


def test_valid_extremes_are_served(conn):
    """Bounds' edges as values: served (200), within the asked length."""

    @fuzz(60)
    @given(st.fixed_dictionaries({
        "prompt": st.text(min_size=1, max_size=50) | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
        "max_tokens": st.integers(1, 4), "temperature": st.sampled_from([0.0, 1e-45, 100.0]),
        "top_p": st.sampled_from([1e-45, 1.0]), "top_k": st.sampled_from([-1, 0, 1, VOCAB]),
        "min_p": st.sampled_from([0.0, 1.0]), "presence_penalty": st.sampled_from([-2.0, 2.0]),
        "frequency_penalty": st.sampled_from([-2.0, 2.0]), "repetition_penalty": st.sampled_from([1e-45, 10.0]),
        "seed": st.sampled_from([0, 2**64 - 1]), "n": st.integers(1, 3), "logprobs": st.integers(0, 20),
        "echo": st.booleans(), "ignore_eos": st.booleans()}))
    def send(body):
        status, out = post(conn, "/v1/completions", json.dumps(body).encode())
        assert status == 200, (out, body)
        response = json.loads(out)
        assert len(response["choices"]) == body["n"]
        assert response["usage"]["completion_tokens"] <= body["n"] * body["max_tokens"]

    send()


def test_server_still_serves_after_everything(server, conn):
    status, _ = post(conn, "/v1/completions", json.dumps({"prompt": "Hello", "max_tokens": 2}).encode())
    assert status == 200
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "serving"}
    scheduler = server.runner.scheduler
    assert not server.runner.requests and scheduler.blocks.num_free == scheduler.blocks.num_total
