"""The OpenAI-compatible HTTP API, through the real `openai` SDK (sync and async) and raw HTTP, against a real
server on 127.0.0.1 (TP=1, a tiny random checkpoint). Numbers are checked against the gRPC API on the same
server and against transformers on the same checkpoint; errors as the SDK's typed exceptions."""

import asyncio
import http.client
import json
import signal
import ssl
import time

import openai
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from router.openai_server import HttpServer
from router.runner import Runner
from router.service import ServingCore
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.certs import make_certificates
from tests.server_process import InProcessServer, ServerProcess

MAX_BODY = 256 * 1024
MAX_WAITING = 12
PROMPT = "The quick brown fox jumps over the lazy dog"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset_config("tiny"), seed=11)


@pytest.fixture(scope="module")
def server(model_dir):
    s = InProcessServer(model_dir, tp=1, http=True, server_options={"max_message_bytes": MAX_BODY},
                        limits_options={"max_new_tokens": 4000}, max_num_seqs=8, max_waiting=MAX_WAITING)
    yield s
    s.stop()


def raw(server, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    port = int(server.http_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} | (headers or {}))
        response = conn.getresponse()
        data = response.read().decode()
        try:
            return response.status, json.loads(data)
        except json.JSONDecodeError:
            return response.status, data
    finally:
        conn.close()


def post(server, path: str, body: dict) -> dict:
    status, out = raw(server, "POST", path, json.dumps(body))
    assert status == 200, out
    return out


def metric(server, name: str, **labels) -> float:
    return server.runner.metrics.registry.get_sample_value(name, labels) or 0.0


def wait_idle(server, timeout: float = 30) -> None:
    """Every sequence ended and every KV block free, as the scheduler and the KV gauge both say."""
    deadline = time.monotonic() + timeout
    scheduler = server.runner.scheduler
    while time.monotonic() < deadline:
        if (not server.runner.requests and scheduler.blocks.num_free == scheduler.blocks.num_total
                and metric(server, "qwen2_kv_cache_blocks_used") == 0):
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {len(server.runner.requests)} requests, "
                         f"{scheduler.blocks.num_total - scheduler.blocks.num_free} blocks held")


# -- completions ----------------------------------------------------------------------------------------------
def test_completion_matches_the_grpc_api(client, grpc_client):
    """Greedy text, tokens' logprobs and top logprobs, usage: equal to gRPC's for the same request."""
    out = client.completions.create(model="test", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    ref = grpc_client.generate(PROMPT, max_new_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    (choice,) = out.choices
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-6)
    for top, ref_lp in zip(choice.logprobs.top_logprobs, ref.logprobs):
        assert sorted(top.values(), reverse=True) == pytest.approx([t.logprob for t in ref_lp.top], abs=1e-6)
    assert out.usage.prompt_tokens == len(grpc_client.tokenize(PROMPT).token_ids)
    assert out.usage.completion_tokens == 12 == len(choice.logprobs.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.id.startswith("cmpl-") and out.created > 0 and out.system_fingerprint and out.model == "test"
    assert choice.logprobs.text_offset[0] == 0 and "".join(choice.logprobs.tokens) == choice.text


def test_prompt_forms_each_get_their_choices(server, client):
    ids = post(server, "/tokenize", {"prompt": PROMPT})["tokens"]
    single = client.completions.create(model="test", prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    out = client.completions.create(model="test", prompt=[PROMPT, "Another one", PROMPT], max_tokens=5,
                                    temperature=0, n=2)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices][:2] == [single, single] == [c.text for c in out.choices][4:]
    by_ids = client.completions.create(model="test", prompt=ids, max_tokens=5, temperature=0)
    by_lists = client.completions.create(model="test", prompt=[ids, ids], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == single and [c.text for c in by_lists.choices] == [single, single]
    assert by_lists.usage.prompt_tokens == 2 * len(ids)


def test_streamed_text_equals_the_whole_text(client):
    prompt = "A prompt that only this test sends, so that the prefix cache has none of it at first"
    whole = client.completions.create(model="test", prompt=prompt, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="test", prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and same_counts(chunks[-1].usage, whole.usage)
    # The second request found the first one's prompt blocks in the prefix cache.
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (whole.usage.prompt_tokens - 1) // 4 * 4 > 0


def same_counts(usage, other) -> bool:
    """Equal token counts (what came from the prefix cache may differ between two requests)."""
    return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        other.prompt_tokens, other.completion_tokens, other.total_tokens)


def test_seeded_choices_are_reproducible_and_independent(client):
    """n = 3 with a seed: choice i is what n = 1 with seed + i gives; without a seed the choices differ."""
    args = dict(model="test", prompt=PROMPT, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    three = [c.text for c in client.completions.create(n=3, seed=7, **args).choices]
    assert three == [c.text for c in client.completions.create(n=3, seed=7, **args).choices]
    assert three == [client.completions.create(n=1, seed=7 + i, **args).choices[0].text for i in range(3)]
    assert len(set(three)) == 3
    assert len({c.text for c in client.completions.create(n=3, **args).choices}) == 3


def test_stop_strings_and_ids(client, grpc_client):
    greedy = client.completions.create(model="test", prompt=PROMPT, max_tokens=20, temperature=0,
                                       extra_body={"ignore_eos": True})
    text = greedy.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.completions.create(model="test", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "zzzz"],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
    ids = grpc_client.generate(PROMPT, max_new_tokens=20, temperature=0.0, ignore_eos=True).token_ids
    by_id = client.completions.create(model="test", prompt=PROMPT, max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True, "stop_token_ids": [ids[3]]})
    assert by_id.choices[0].finish_reason == "stop" and by_id.usage.completion_tokens == ids.index(ids[3]) + 1


# -- chat -----------------------------------------------------------------------------------------------------
def test_chat_renders_the_checkpoint_template(client, grpc_client, model_dir):
    out = client.chat.completions.create(model="test", messages=CHAT, max_completion_tokens=10, temperature=0)
    expected = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(CHAT, add_generation_prompt=True,
                                                                           tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert out.usage.prompt_tokens == len(expected)
    ref = grpc_client.chat(CHAT, max_new_tokens=10, temperature=0.0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    # Text parts are joined; max_tokens is max_completion_tokens' older spelling.
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]}, CHAT[1]]
    again = client.chat.completions.create(model="test", messages=parts, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == out.choices[0].message.content


def test_chat_logprobs_equal_the_grpc_api(client, grpc_client):
    out = client.chat.completions.create(model="test", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2)
    ref = grpc_client.chat(CHAT, max_new_tokens=6, temperature=0.0, logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-6)
    assert [t.logprob for c in content for t in c.top_logprobs] == pytest.approx(
        [t.logprob for lp in ref.logprobs for t in lp.top], abs=1e-6)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode() == out.choices[0].message.content


def test_async_chat_stream(server):
    async def scenario():
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="x", max_retries=0) as client:
            whole = await client.chat.completions.create(model="test", messages=CHAT, max_tokens=12, temperature=0,
                                                         n=2)
            stream = await client.chat.completions.create(model="test", messages=CHAT, max_tokens=12, temperature=0,
                                                          n=2, stream=True, stream_options={"include_usage": True})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(scenario())
    firsts = {}
    for chunk in chunks:
        for c in chunk.choices:
            firsts.setdefault(c.index, c.delta)
    assert all(d.role == "assistant" for d in firsts.values()) and sorted(firsts) == [0, 1]
    for i in range(2):
        text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == i)
        assert text == whole.choices[i].message.content
    assert same_counts(chunks[-1].usage, whole.usage) and whole.usage.completion_tokens == 24


def test_continue_final_message_and_template_kwargs(server, client, model_dir):
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi the"}]
    hf = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, continue_final_message=True,
                                                                     tokenize=False)
    ours = post(server, "/tokenize", {"messages": messages, "continue_final_message": True,
                                      "add_generation_prompt": False, "return_token_strs": True})
    assert ours["tokens"] == post(server, "/tokenize", {"prompt": hf})["tokens"]
    assert post(server, "/detokenize", {"tokens": ours["tokens"]})["prompt"] == hf
    out = client.chat.completions.create(model="test", messages=messages, max_tokens=3, temperature=0,
                                         extra_body={"continue_final_message": True,
                                                     "chat_template_kwargs": {"enable_thinking": False}})
    assert out.usage.prompt_tokens == ours["count"] == len(ours["token_strs"])


# -- echo and prompt logprobs ---------------------------------------------------------------------------------
def test_echo_prompt_logprobs_match_transformers(server, client, model_dir):
    """How eval harnesses score a text: echo + logprobs + max_tokens 0, against transformers' float32 logits."""
    ids = post(server, "/tokenize", {"prompt": PROMPT})["tokens"]
    out = client.completions.create(model="test", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    (choice,) = out.choices
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert choice.text == PROMPT and out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    top2 = logprobs[:-1].topk(2).values.flatten().tolist()
    got = [lp for t in choice.logprobs.top_logprobs[1:] for lp in sorted(t.values(), reverse=True)]
    assert got == pytest.approx(top2, abs=1e-4)
    # With generation after the echo: the prompt's rows, then the generated tokens'.
    more = client.completions.create(model="test", prompt=PROMPT, max_tokens=3, echo=True, logprobs=0,
                                     temperature=0).choices[0]
    plain = client.completions.create(model="test", prompt=PROMPT, max_tokens=3, logprobs=0, temperature=0).choices[0]
    assert more.text == PROMPT + plain.text and len(more.logprobs.tokens) == len(ids) + 3
    assert more.logprobs.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)


def test_logit_bias_and_min_tokens(server, client, grpc_client):
    greedy = grpc_client.generate(PROMPT, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    banned = client.completions.create(model="test", prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={str(greedy.token_ids[0]): -100}, extra_body={"ignore_eos": True})
    assert banned.choices[0].text != greedy.text
    eos = 151643  # the tiny checkpoint's end of sequence, pushed up by the bias, held off by min_tokens
    forced = client.completions.create(model="test", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={"42": 50, str(eos): 100}, extra_body={"min_tokens": 4})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "stop"
    assert forced.choices[0].text == post(server, "/detokenize", {"tokens": [42] * 4})["prompt"]


# -- metadata, tokenizer --------------------------------------------------------------------------------------
def test_models_health_version(server, client):
    (model,) = client.models.list().data
    assert model.id == "test" and model.object == "model" and model.owned_by and model.created > 0
    assert model.max_model_len == server.server.core.limits.max_model_len
    assert client.models.retrieve("test").id == "test"
    assert raw(server, "GET", "/health") == (200, {"status": "serving"})
    status, body = raw(server, "GET", "/version")
    assert status == 200 and body["version"]


# -- errors ---------------------------------------------------------------------------------------------------
def test_errors_are_the_sdks_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="test", prompt=PROMPT, temperature=-1.0)
    assert e.value.body["param"] == "temperature" and "`temperature` must be >= 0.0" in e.value.message
    assert "got -1.0" in e.value.message
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens") as e:
        client.chat.completions.create(model="test", messages=CHAT, max_completion_tokens=10**6)
    assert e.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError, match="`tool_choice` needs `tools` to hold 'g'") as e:
        client.chat.completions.create(model="test", messages=CHAT, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {}}}], tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(openai.BadRequestError, match="response_format.json_schema.schema` is required"):
        client.chat.completions.create(model="test", messages=CHAT, response_format={"type": "json_schema"})
    with pytest.raises(openai.BadRequestError, match="not a field of this request") as e:
        client.completions.create(model="test", prompt=PROMPT, extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate"
    with pytest.raises(openai.BadRequestError, match="images, audio and files are not supported"):
        client.chat.completions.create(model="test", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"


def test_a_full_queue_is_429_and_admits_nothing(server, client):
    """More sequences than the waiting queue holds, in one request: 429, and none of them stays queued."""
    before = metric(server, "qwen2_requests_failed_total", kind="overloaded", api="http")
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="test", prompt=[PROMPT] * (MAX_WAITING + 4), max_tokens=2)
    assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
    assert metric(server, "qwen2_requests_failed_total", kind="overloaded", api="http") == before + MAX_WAITING + 4
    wait_idle(server)


def test_auth_tls_and_not_serving(server, tmp_path):
    """The bearer token and mTLS as gRPC takes them (health open); 503 before the engine serves."""
    certs = make_certificates(tmp_path)
    core = server.server.core
    secure = HttpServer(core, "test", "0", "127.0.0.1", 0, auth_token="s3cret", tls_cert_file=str(certs / "server.pem"),
                        tls_key_file=str(certs / "server.key"), tls_client_ca_file=str(certs / "ca.pem"))
    idle_core = ServingCore(Runner(server.runner.engine, core.tokenizer), core.tokenizer, core.defaults, core.limits)
    starting = HttpServer(idle_core, "test", "0", "127.0.0.1", 0)
    server.call(secure.start())
    server.call(starting.start())
    try:
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))

        def call(path, token=None, ctx=context):
            conn = http.client.HTTPSConnection("127.0.0.1", secure.port, context=ctx, timeout=30)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
                return r.status, json.loads(r.read())
            finally:
                conn.close()

        assert call("/v1/models", "s3cret")[0] == 200
        status, body = call("/v1/models", "wrong")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert call("/v1/models")[0] == 401 and call("/health")[0] == 200
        no_cert = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            call("/health", ctx=no_cert)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{starting.port}/v1", api_key="x", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as e:  # the SDK's class for every 5xx
                c.completions.create(model="test", prompt=PROMPT, max_tokens=2)
            assert e.value.status_code == 503
        conn = http.client.HTTPConnection("127.0.0.1", starting.port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        conn.close()
    finally:
        server.call(secure.stop())
        server.call(starting.stop())


# -- raw HTTP -------------------------------------------------------------------------------------------------
def test_sse_framing_and_done(server):
    port = int(server.http_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": "test", "messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    text = response.read().decode()
    conn.close()
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "chat.completion.chunk" and p["id"] == payloads[0]["id"] for p in payloads)


@pytest.mark.parametrize("path,body,headers,status,says", [
    ("/v1/completions", '{"model": "test", "prompt": "x",', {}, 400, "not valid JSON"),
    ("/v1/completions", '{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("/v1/completions", '[1, 2]', {}, 400, "JSON object"),
    ("/v1/chat/completions", '{"messages": "hi"}', {}, 400, "messages"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 1e999}', {}, 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "' + "a" * MAX_BODY + '"}', {}, 413, "larger than"),
    ("/v1/nothing", '{}', {}, 404, "no route"),
])
def test_bad_bodies_and_routes(server, path, body, headers, status, says):
    got, answer = raw(server, "POST", path, body, headers)
    assert got == status and says in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_blocks_at_once(server, stream):
    before = metric(server, "qwen2_requests_failed_total", kind="cancelled", api="http")
    port = int(server.http_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": "test", "prompt": PROMPT, "max_tokens": 3900, "ignore_eos": True, "stream": stream}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    deadline = time.monotonic() + 30
    while not server.runner.scheduler.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.runner.requests, "the request ended before the client left"
    conn.sock.close()  # the client goes away mid-generation
    conn.close()
    wait_idle(server, timeout=10)
    assert metric(server, "qwen2_requests_failed_total", kind="cancelled", api="http") == before + 1


def test_http_requests_are_counted_under_their_api(server, client):
    received = metric(server, "qwen2_requests_received_total", api="http")
    grpc_received = metric(server, "qwen2_requests_received_total", api="grpc")
    client.completions.create(model="test", prompt=PROMPT, max_tokens=2, n=2)
    assert metric(server, "qwen2_requests_received_total", api="http") == received + 2
    assert metric(server, "qwen2_requests_received_total", api="grpc") == grpc_received
    assert metric(server, "qwen2_requests_finished_total", finish_reason="length", api="http") >= 2
    assert metric(server, "qwen2_time_to_first_token_seconds_count", api="http") >= 2


# -- the command line: flags, SIGTERM drains HTTP streams -----------------------------------------------------
def test_serve_drains_http_streams_on_sigterm(model_dir):
    server = ServerProcess(model_dir, "--served-model-name", "qwen-test", "--drain-timeout", "60", tp=1)
    url = f"http://127.0.0.1:{server.http_port}"

    async def scenario():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            assert [m.id for m in (await client.models.list()).data] == ["qwen-test"]

            async def stream(i):
                chunks = await client.completions.create(model="qwen-test", prompt=f"drain {i}", max_tokens=250,
                                                         stream=True, stream_options={"include_usage": True},
                                                         extra_body={"ignore_eos": True})
                return [c async for c in chunks]

            streams = [asyncio.ensure_future(stream(i)) for i in range(3)]
            while server.metric("qwen2_generation_tokens_total") < 3:
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            while (await asyncio.to_thread(raw_health, url)) != 503:
                await asyncio.sleep(0.02)
            with pytest.raises(openai.InternalServerError):  # draining: 503
                await client.completions.create(model="qwen-test", prompt="late", max_tokens=2)
            return await asyncio.gather(*streams)

    try:
        server.wait_serving()
        results = asyncio.run(scenario())
        assert [r[-1].usage.completion_tokens for r in results] == [250] * 3
        assert all([c.choices[0].finish_reason for c in r if c.choices][-1] == "length" for r in results)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def raw_health(url: str) -> int | None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()
