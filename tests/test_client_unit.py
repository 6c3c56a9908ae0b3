"""The client SDK without a real server: request building, error mapping, backoff, the CLI, packaging,
and the transport behaviour (retries, streams, cancellation, deadlines, metadata, TLS) against in-process
fake servicers."""

import asyncio
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import qwen2_client
from qwen2_client import (AsyncClient, CancelledError, Client, DeadlineError, Delta, FinalInfo, OverloadedError,
                          Qwen2Error, Result, RetryPolicy, ServerError, Timings, TokenLogprob, TopLogprob,
                          UnavailableError, Usage, ValidationError, build_generate_request, build_parameters,
                          build_tokenize_request, cli, error_from_rpc, error_from_status)
from qwen2_client.proto import serving_pb2 as pb
from qwen2_client.proto import serving_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)


# ---------------------------------------------------------------------------------------------- requests
def test_only_given_parameters_are_set():
    assert build_parameters().ListFields() == []
    p = build_parameters(temperature=0, top_k=0, seed=0, ignore_eos=False, max_new_tokens=None, top_p=None)
    # explicit presence: zeros and False that were given are sent; None ones are not
    assert {f.name for f, _ in p.ListFields()} == {"temperature", "top_k", "seed", "ignore_eos"}
    assert p.HasField("temperature") and not p.HasField("top_p") and not p.HasField("max_new_tokens")
    p = build_parameters(max_new_tokens=16, temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                         presence_penalty=0.5, frequency_penalty=0.25, seed=2**40, stop=["\n\n", "END"],
                         stop_token_ids=[151643], ignore_eos=True, logprobs=5, top_k=20, logit_bias={7: -100, 9: 2.5},
                         min_tokens=3, prompt_logprobs=0, skip_special_tokens=False, include_stop_str_in_output=True,
                         cache_salt="tenant-a")
    constraints = {f.name for f in pb.GenerationParameters.DESCRIPTOR.oneofs_by_name["constraint"].fields}
    assert {f.name for f, _ in p.ListFields()} == {f.name for f in pb.GenerationParameters.DESCRIPTOR.fields} - constraints
    # the constraints are a oneof: each set alone
    assert build_parameters(json_schema={"type": "object"}).json_schema == '{"type": "object"}'
    assert list(build_parameters(choice=["a", "b"]).choice.choices) == ["a", "b"]
    assert build_parameters(regex="[a-z]+").WhichOneof("constraint") == "regex"
    assert build_parameters(json_object=True).json_object and build_parameters(grammar="root ::= \"x\"").grammar
    assert (p.max_new_tokens, p.top_k, p.seed, list(p.stop), list(p.stop_token_ids), p.logprobs) == (
        16, 20, 2**40, ["\n\n", "END"], [151643], 5)
    assert p.temperature == pytest.approx(0.7) and p.ignore_eos is True
    assert (dict(p.logit_bias), p.min_tokens, p.prompt_logprobs) == ({7: -100.0, 9: 2.5}, 3, 0)
    assert p.HasField("prompt_logprobs") and p.skip_special_tokens is False and p.include_stop_str_in_output
    assert list(build_parameters(stop="###").stop) == ["###"]  # one string is one stop string


def test_bad_parameters_fail_before_any_call():
    with pytest.raises(TypeError, match="unknown generation parameter.*max_tokens"):
        build_parameters(max_tokens=3)
    with pytest.raises(TypeError, match="max_new_tokens must be an integer"):
        build_parameters(max_new_tokens=1.5)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        build_parameters(seed=-1)
    with pytest.raises(TypeError, match="temperature must be a number"):
        build_parameters(temperature="hot")
    with pytest.raises(TypeError, match="logit_bias must be a mapping"):
        build_parameters(logit_bias=[(1, 2.0)])
    with pytest.raises(TypeError, match="logit_bias must be a number"):
        build_parameters(logit_bias={1: "high"})


def test_generate_request_sets_one_input():
    r = build_generate_request("Hello", max_new_tokens=4)
    assert r.WhichOneof("input") == "text" and r.text == "Hello" and r.parameters.max_new_tokens == 4
    assert not r.request_id and not r.parameters.HasField("temperature")

    r = build_generate_request([1, 2, 3], request_id="abc")
    assert r.WhichOneof("input") == "token_ids" and list(r.token_ids.ids) == [1, 2, 3] and r.request_id == "abc"
    assert build_generate_request(token_ids=[]).WhichOneof("input") == "token_ids"

    msgs = [{"role": "system", "content": "Be brief."}, ("user", "Hi"), pb.ChatMessage(role="assistant", content="Yo")]
    r = build_generate_request(msgs)
    assert r.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in r.chat.messages] == [("system", "Be brief."), ("user", "Hi"),
                                                               ("assistant", "Yo")]
    assert not r.chat.HasField("add_generation_prompt")  # server default (true)
    r = build_generate_request(messages=msgs[:1], add_generation_prompt=False)
    assert r.chat.HasField("add_generation_prompt") and r.chat.add_generation_prompt is False

    for bad in (dict(), dict(text="a", token_ids=[1]), dict(prompt="a", messages=msgs)):
        with pytest.raises(TypeError, match="exactly one input"):
            build_generate_request(**bad)
    with pytest.raises(TypeError, match="chat messages only"):
        build_generate_request("a", add_generation_prompt=True)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        build_generate_request(messages=[{"role": "user"}])


def test_tokenize_request():
    assert build_tokenize_request("hi").WhichOneof("input") == "text"
    r = build_tokenize_request(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert r.WhichOneof("input") == "chat" and r.chat.add_generation_prompt is True
    with pytest.raises(TypeError):
        build_tokenize_request([1, 2])


# ---------------------------------------------------------------------------------------------- errors
def status_bytes(code, message, *details) -> bytes:
    status = status_pb2.Status(code=code, message=message)
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        status.details.append(a)
    return status.SerializeToString()


def bad_request(*violations):
    return error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, ValidationError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineError),
    (grpc.StatusCode.CANCELLED, CancelledError),
    (grpc.StatusCode.INTERNAL, ServerError),
    (grpc.StatusCode.UNKNOWN, ServerError),
    (grpc.StatusCode.UNIMPLEMENTED, ServerError),
    (grpc.StatusCode.UNAUTHENTICATED, ServerError),
    (grpc.StatusCode.NOT_FOUND, ServerError),
])
def test_status_codes_map_to_exceptions(code, cls):
    err = error_from_status(code, "something happened")
    assert type(err) is cls or (cls is ServerError and isinstance(err, ServerError))
    assert isinstance(err, Qwen2Error) and err.code is code and err.details == "something happened"
    assert str(err) == f"{code.name}: something happened"


def test_bad_request_field_violations_from_status_details():
    raw = status_bytes(code_pb2.INVALID_ARGUMENT, "2 invalid parameters",
                       bad_request(("parameters.temperature", "must be >= 0 (got -1)"),
                                   ("parameters.top_p", "must be in (0, 1] (got 1.5)")))
    err = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "2 invalid parameters",
                            [("content-type", "application/grpc"), ("grpc-status-details-bin", raw)])
    assert isinstance(err, ValidationError) and isinstance(err, ValueError)
    assert err.field_violations == [("parameters.temperature", "must be >= 0 (got -1)"),
                                    ("parameters.top_p", "must be in (0, 1] (got 1.5)")]
    assert err.status.code == code_pb2.INVALID_ARGUMENT
    assert cli.error_line(err) == ("INVALID_ARGUMENT: parameters.temperature: must be >= 0 (got -1); "
                                   "parameters.top_p: must be in (0, 1] (got 1.5)")
    # no details trailer, or garbage in it: a ValidationError all the same, without violations
    assert error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad").field_violations == []
    junk = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad", [("grpc-status-details-bin", b"\xff\xff")])
    assert junk.field_violations == [] and str(junk) == "INVALID_ARGUMENT: bad"


def test_error_from_an_rpc_error_and_retry_info():
    class FakeCall(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "queue full (64 waiting)"

        def trailing_metadata(self):
            hint = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
            return (("grpc-status-details-bin", status_bytes(code_pb2.RESOURCE_EXHAUSTED, "queue full", hint)),)

    err = error_from_rpc(FakeCall())
    assert isinstance(err, OverloadedError) and err.retry_delay == pytest.approx(1.5)
    assert error_from_rpc(grpc.RpcError()).__class__ is ServerError  # not a Call: still typed


# ---------------------------------------------------------------------------------------------- backoff
def test_backoff_schedule_is_bounded_full_jitter():
    policy = RetryPolicy(max_attempts=8, base_delay=0.1, max_delay=1.0, rng=random.Random(0))
    assert [policy.ceiling(n) for n in range(1, 8)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    for n in range(1, 8):
        samples = [policy.backoff(n) for _ in range(2000)]
        assert 0 <= min(samples) and max(samples) <= policy.ceiling(n)
        assert min(samples) < 0.1 * policy.ceiling(n) and max(samples) > 0.9 * policy.ceiling(n)  # the whole range


def test_which_errors_are_retried():
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0)
    unavailable = error_from_status(grpc.StatusCode.UNAVAILABLE, "")
    overloaded = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    for err in (unavailable, overloaded):
        assert 0 <= policy.delay_after(1, err, None) <= 0.1
        assert 0 <= policy.delay_after(2, err, None) <= 0.2
        assert policy.delay_after(3, err, None) is None  # max_attempts reached
        assert policy.delay_after(1, err, remaining=0.0) is None  # no time left before the deadline
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        assert policy.delay_after(1, error_from_status(code, ""), None) is None
    assert RetryPolicy(max_attempts=1).delay_after(1, unavailable, None) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


# ---------------------------------------------------------------------------------------------- results
def sample_final(**kw):
    return pb.FinalInfo(finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(prompt_tokens=3, generated_tokens=2),
                        timings=pb.Timings(queue_seconds=0.01, time_to_first_token_seconds=0.05,
                                           total_seconds=0.1), matched_stop="\n", rope_variant="original", **kw)


def sample_logprobs():
    return [pb.TokenLogprob(token_id=11, logprob=-0.5, top=[pb.TopLogprob(token_id=11, logprob=-0.5),
                                                            pb.TopLogprob(token_id=12, logprob=-1.25)]),
            pb.TokenLogprob(token_id=13, logprob=-0.25)]


def test_results_from_responses():
    r = Result.from_pb(pb.GenerateResponse(request_id="r1", text=" Paris", token_ids=[11, 13],
                                           logprobs=sample_logprobs(), final=sample_final(),
                                           prompt_logprobs=sample_logprobs()[1:]))
    assert (r.request_id, r.text, r.token_ids, r.finish_reason, r.matched_stop, r.rope_variant) == (
        "r1", " Paris", [11, 13], "stop", "\n", "original")
    assert r.usage == Usage(3, 2) and r.timings.total_seconds == pytest.approx(0.1)
    assert r.logprobs[0] == TokenLogprob(11, -0.5, [TopLogprob(11, -0.5), TopLogprob(12, -1.25)])
    assert r.prompt_logprobs == [TokenLogprob(13, -0.25)]
    for value, name in ((pb.FINISH_REASON_LENGTH, "length"), (pb.FINISH_REASON_EOS, "eos"),
                        (pb.FINISH_REASON_CANCELLED, "cancelled"), (pb.FINISH_REASON_UNSPECIFIED, "unspecified")):
        assert Result.from_pb(pb.GenerateResponse(final=pb.FinalInfo(finish_reason=value))).finish_reason == name
    assert Result.from_pb(pb.GenerateResponse()).matched_stop is None

    deltas = [Delta.from_pb(pb.GenerateStreamResponse(request_id="r1", text=" Pa", token_ids=[11],
                                                      logprobs=sample_logprobs()[:1],
                                                      prompt_logprobs=sample_logprobs()[1:])),
              Delta.from_pb(pb.GenerateStreamResponse(request_id="r1", text="ris", token_ids=[13],
                                                      logprobs=sample_logprobs()[1:], final=sample_final()))]
    assert deltas[0].final is None and deltas[1].final.finish_reason == "stop"
    assert Result.from_deltas(deltas) == r


# ---------------------------------------------------------------------------------------------- CLI
SAMPLE = Result(request_id="r1", text=" Paris", token_ids=[11, 13],
                logprobs=[TokenLogprob(11, -0.5, [TopLogprob(11, -0.5), TopLogprob(12, -1.25)]),
                          TokenLogprob(13, -0.25, [TopLogprob(13, -0.25), TopLogprob(12, -2.0)])],
                finish_reason="length", usage=Usage(3, 2), timings=Timings(0.01, 0.05, 0.1), rope_variant="original")


def test_cli_arguments():
    ap = cli.build_parser()
    a = ap.parse_args(["generate", "Hello", "--max-new-tokens", "8", "--temperature", "0", "--stop", "\n",
                       "--stop", "END", "--seed", "3", "--logprobs", "2", "--ignore-eos", "--json"])
    assert a.command == "generate" and a.text == "Hello" and a.json
    assert cli.generation_params(a) == dict(max_new_tokens=8, temperature=0.0, stop=["\n", "END"], seed=3,
                                            logprobs=2, ignore_eos=True)
    a = ap.parse_args(["--target", "h:1", "stream", "--token-ids", "1, 2,3", "--top-p", "0.9", "--top-k", "5"])
    assert a.target == "h:1" and a.token_ids == [1, 2, 3] and cli.generation_params(a) == dict(top_p=0.9, top_k=5)
    a = ap.parse_args(["generate", "x", "--target", "h:2", "--timeout", "2.5", "--tls", "--ca", "ca.pem"])
    assert (a.target, a.timeout, a.tls, a.ca) == ("h:2", 2.5, True, "ca.pem")  # options after the command too
    assert ap.parse_args(["--target", "h:3", "info"]).target == "h:3"  # ... and before it, not reset
    assert cli.generation_params(ap.parse_args(["generate", "x"])) == {}  # nothing given: nothing sent
    assert ap.parse_args(["chat", "[]", "--no-generation-prompt"]).add_generation_prompt is False
    a = ap.parse_args(["generate", "x", "--logit-bias", "151643:-100, 9707:5", "--min-tokens", "4",
                       "--prompt-logprobs", "1", "--max-new-tokens", "0", "--no-skip-special-tokens",
                       "--include-stop-str-in-output"])
    assert cli.generation_params(a) == dict(logit_bias={151643: -100.0, 9707: 5.0}, min_tokens=4, prompt_logprobs=1,
                                            max_new_tokens=0, skip_special_tokens=False,
                                            include_stop_str_in_output=True)
    assert cli.generation_params(ap.parse_args(["generate", "x", "--logit-bias", '{"5": 1}'])) == {
        "logit_bias": {5: 1.0}}
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["generate", "--token-ids", "1,x"])
    assert e.value.code == 2


def test_cli_token_from_env(monkeypatch):
    monkeypatch.setenv("QWEN2_TOKEN", "s3cret")
    monkeypatch.setenv("QWEN2_TARGET", "envhost:9")
    a = cli.build_parser().parse_args(["health"])
    assert a.token == "s3cret" and a.target == "envhost:9"


class FakeClient:
    """Stands in for Client in CLI tests: records the call, returns a canned Result or raises."""

    def __init__(self, outcome):
        self.outcome, self.calls = outcome, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def generate(self, **kw):
        self.calls.append(("generate", kw))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def generate_stream(self, **kw):
        self.calls.append(("generate_stream", kw))

        class Stream(list):
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        return Stream([Delta(" Pa", [11], SAMPLE.logprobs[:1]),
                       Delta("ris", [13], SAMPLE.logprobs[1:], FinalInfo("length", Usage(3, 2)))])


def run_cli(monkeypatch, capsys, argv, outcome=SAMPLE):
    fake = FakeClient(outcome)
    monkeypatch.setattr(cli, "make_client", lambda args: fake)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err, fake


def test_cli_json_output_shape(monkeypatch, capsys):
    code, out, err, fake = run_cli(monkeypatch, capsys,
                                   ["generate", "--token-ids", "1,2,3", "--logprobs", "1", "--json"])
    assert code == 0 and err == ""
    assert fake.calls == [("generate", dict(token_ids=[1, 2, 3], request_id=None, logprobs=1))]
    lines = out.splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert {"token_ids", "text", "finish_reason", "logprobs", "usage"} <= set(obj)
    assert obj["token_ids"] == [11, 13] and obj["text"] == " Paris" and obj["finish_reason"] == "length"
    assert obj["usage"] == {"prompt_tokens": 3, "generated_tokens": 2, "cached_tokens": 0}
    assert obj["logprobs"][0] == {"token_id": 11, "logprob": -0.5,
                                  "top": [{"token_id": 11, "logprob": -0.5}, {"token_id": 12, "logprob": -1.25}]}

    code, out, _, _ = run_cli(monkeypatch, capsys, ["generate", "Hi"])
    assert code == 0 and out == " Paris\n"


def test_cli_stream_and_chat(monkeypatch, capsys, tmp_path):
    code, out, _, fake = run_cli(monkeypatch, capsys, ["stream", "Hi", "--max-new-tokens", "2"])
    assert code == 0 and out == " Paris\n" and fake.calls[0][1]["text"] == "Hi"
    code, out, _, _ = run_cli(monkeypatch, capsys, ["stream", "Hi", "--json"])
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == [" Pa", "ris"] and rows[0]["final"] is None
    assert rows[1]["final"]["finish_reason"] == "length"

    msgs = [{"role": "user", "content": "Hi"}]
    (tmp_path / "m.json").write_text(json.dumps(msgs))
    for arg in (json.dumps(msgs), f"@{tmp_path / 'm.json'}", json.dumps({"messages": msgs})):
        code, out, _, fake = run_cli(monkeypatch, capsys, ["chat", arg, "--temperature", "0"])
        assert code == 0 and fake.calls == [("generate", dict(messages=msgs, add_generation_prompt=True,
                                                              request_id=None, temperature=0.0))]


@pytest.mark.parametrize("argv, outcome, exit_code, message", [
    (["generate", "x"], ValidationError("INVALID_ARGUMENT: bad", field_violations=[("parameters.top_p", "> 1")]),
     2, "qwen2-client: error: INVALID_ARGUMENT: parameters.top_p: > 1\n"),
    (["generate", "x"], error_from_status(grpc.StatusCode.UNAVAILABLE, "no shards\nat all"), 3,
     "qwen2-client: error: UNAVAILABLE: no shards at all\n"),
    (["generate", "x"], error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), 3, None),
    (["generate", "x"], error_from_status(grpc.StatusCode.INTERNAL, "boom"), 1, "qwen2-client: error: INTERNAL: boom\n"),
    (["generate", "x"], error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, ""), 1, None),
    (["generate"], SAMPLE, 2, None),  # no input
    (["generate", "x", "--token-ids", "1"], SAMPLE, 2, None),  # two inputs
    (["chat", "not json"], SAMPLE, 2, None),
    (["chat", "@/nonexistent/m.json"], SAMPLE, 2, None),
])
def test_cli_errors_are_one_line_and_exit_codes(monkeypatch, capsys, argv, outcome, exit_code, message):
    code, out, err, _ = run_cli(monkeypatch, capsys, argv, outcome)
    assert code == exit_code and out == ""
    assert err.startswith("qwen2-client: error: ") and err.count("\n") == 1
    if message:
        assert err == message


# ---------------------------------------------------------------------------------------------- packaging
def test_pip_install_client_alone_and_no_torch_or_ray(tmp_path):
    """`pip install ./client` builds on its own; importing the SDK (with torch and ray importable) loads neither."""
    src = tmp_path / "client"
    shutil.copytree(ROOT / "client", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(src)],
                   check=True, timeout=120, capture_output=True)
    # grpcio, protobuf, ... come from this (test) environment's site-packages, appended after the fresh
    # venv's own, which is where qwen2_client must be found; torch and ray are importable from there too.
    site = sysconfig.get_paths()["purelib"]
    probe = (
        "import sys; sys.path.append(%r)\n"
        "import importlib.util, qwen2_client, qwen2_client.cli, qwen2_client.aio\n"
        "assert importlib.util.find_spec('torch') and importlib.util.find_spec('ray')  # importable, yet not imported\n"
        "assert %r in qwen2_client.__file__, qwen2_client.__file__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'shards', 'cluster', 'router'))\n"
        "assert not bad, bad\n"
        "print('ok', qwen2_client.__version__)\n" % (site, str(venv)))
    run = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr
    assert (venv / "bin" / "qwen2-client").exists()
    meta = subprocess.run([str(py), "-c", "from importlib.metadata import requires; print(requires('qwen2-client'))"],
                          capture_output=True, text=True, timeout=60).stdout
    assert "grpcio" in meta and "protobuf" in meta and "torch" not in meta and "ray" not in meta


def test_importing_the_sdk_in_process_loads_no_torch_or_ray():
    probe = ("import sys, qwen2_client, qwen2_client.cli; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')]; assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------------------------------------- transport
class FakeGeneration(pb_grpc.GenerationServicer):
    """Scripted behaviour: `failures` is a list of status codes to answer with (one per call) before working."""

    def __init__(self):
        self.failures: list[grpc.StatusCode] = []
        self.calls = 0
        self.requests = []
        self.metadata = []
        self.cancelled = threading.Event()
        self.stream_fail_after_first = False
        self.sleep = 0.0
        self.lock = threading.Lock()

    def _enter(self, request, context):
        with self.lock:
            self.calls += 1
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            code = self.failures.pop(0) if self.failures else None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raw = status_bytes(code_pb2.INVALID_ARGUMENT, "max_new_tokens too large",
                               bad_request(("parameters.max_new_tokens", "must be <= 4096 (got 100000)")))
            context.set_trailing_metadata((("grpc-status-details-bin", raw),))
            context.abort(code, "max_new_tokens too large")
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        if self.sleep:
            time.sleep(self.sleep)

    def Generate(self, request, context):
        self._enter(request, context)
        return pb.GenerateResponse(request_id=request.request_id or "gen-1", text="ok", token_ids=[7, 8],
                                   logprobs=sample_logprobs(), final=sample_final())

    def GenerateStream(self, request, context):
        self._enter(request, context)
        ended = []  # set when the handler itself ends the call; otherwise the callback means "cancelled"
        context.add_callback(lambda: None if ended else self.cancelled.set())
        n = request.parameters.max_new_tokens if request.parameters.HasField("max_new_tokens") else 3
        for i in range(n):
            if i == 1 and self.stream_fail_after_first:
                ended.append(True)
                context.abort(grpc.StatusCode.UNAVAILABLE, "shard died")
            final = sample_final() if i == n - 1 else None
            if final is not None:
                ended.append(True)
            yield pb.GenerateStreamResponse(request_id="s-1", text=f"t{i}", token_ids=[i], final=final)
            if self.sleep:
                time.sleep(self.sleep)

    def Tokenize(self, request, context):
        self._enter(request, context)
        if request.WhichOneof("input") == "chat":
            return pb.TokenizeResponse(token_ids=[1, 2], tokens=["<a>", "b"], rendered="<a>b")
        return pb.TokenizeResponse(token_ids=[len(request.text)], tokens=[request.text])

    def ModelInfo(self, request, context):
        self._enter(request, context)
        return pb.ModelInfoResponse(model="fake", max_model_len=64, vocab_size=1000, eos_token_ids=[5, 6],
                                    tensor_parallel_size=2, pipeline_parallel_size=1, dtype="float32",
                                    device="cpu", max_new_tokens_limit=32, num_kv_blocks=10, block_size=16,
                                    version="0.1.0")


def start_server(servicer, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, port, health_servicer


@pytest.fixture
def fake():
    servicer = FakeGeneration()
    server, port, health_servicer = start_server(servicer)
    servicer.port, servicer.health = port, health_servicer
    yield servicer
    server.stop(None)


def test_client_calls_and_metadata(fake):
    with Client(f"127.0.0.1:{fake.port}", token="tok", metadata=[("X-Tenant", "a")], retry=FAST) as c:
        r = c.generate("Hi", max_new_tokens=2, temperature=0, request_id="mine")
        assert (r.request_id, r.text, r.token_ids, r.finish_reason) == ("mine", "ok", [7, 8], "stop")
        req = fake.requests[-1]
        assert req.text == "Hi" and req.parameters.temperature == 0 and req.parameters.HasField("temperature")
        assert not req.parameters.HasField("top_p")
        assert fake.metadata[-1]["authorization"] == "Bearer tok" and fake.metadata[-1]["x-tenant"] == "a"
        assert c.chat([{"role": "user", "content": "Hi"}]).text == "ok"
        assert fake.requests[-1].chat.add_generation_prompt is True
        assert c.tokenize("abc").token_ids == [3]
        assert c.tokenize(messages=[("user", "x")]).rendered == "<a>b"
        info = c.model_info()
        assert info.model == "fake" and info.eos_token_ids == [5, 6] and info.tensor_parallel_size == 2
        assert c.health() == "SERVING" and c.is_serving()
        fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert c.health() == "NOT_SERVING" and not c.is_serving()


def test_unary_retries_only_unavailable_and_overloaded(fake):
    with Client(f"127.0.0.1:{fake.port}", retry=FAST) as c:
        fake.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert c.generate("x").text == "ok" and fake.calls == 3
        fake.calls, fake.failures = 0, [grpc.StatusCode.UNAVAILABLE] * 3
        with pytest.raises(UnavailableError, match="scripted UNAVAILABLE"):
            c.generate("x")
        assert fake.calls == 3  # max_attempts
        fake.calls, fake.failures = 0, [grpc.StatusCode.INVALID_ARGUMENT]
        with pytest.raises(ValidationError) as e:
            c.generate("x", max_new_tokens=100000)
        assert fake.calls == 1
        assert e.value.field_violations == [("parameters.max_new_tokens", "must be <= 4096 (got 100000)")]
        fake.calls, fake.failures = 0, [grpc.StatusCode.INTERNAL]
        with pytest.raises(ServerError):
            c.tokenize("x")
        assert fake.calls == 1


def test_stream_retries_before_first_message_only(fake):
    with Client(f"127.0.0.1:{fake.port}", retry=FAST) as c:
        fake.failures = [grpc.StatusCode.UNAVAILABLE]
        deltas = list(c.generate_stream("x", max_new_tokens=3))
        assert [d.text for d in deltas] == ["t0", "t1", "t2"] and fake.calls == 2
        assert deltas[-1].final.finish_reason == "stop" and all(d.final is None for d in deltas[:-1])
        assert c.generate_stream("x").collect().text == "t0t1t2"

        fake.calls, fake.stream_fail_after_first = 0, True
        stream = c.generate_stream("x", max_new_tokens=3)
        assert next(stream).text == "t0"
        with pytest.raises(UnavailableError, match="shard died"):
            next(stream)
        assert fake.calls == 1  # a stream that had delivered is never retried (tokens would repeat)
        with pytest.raises(StopIteration):
            next(stream)


def test_leaving_a_stream_early_cancels_it(fake):
    fake.sleep = 0.05
    with Client(f"127.0.0.1:{fake.port}", retry=FAST) as c:
        with c.generate_stream("x", max_new_tokens=200) as s:  # leaving the with block cancels
            next(s)
        assert fake.cancelled.wait(5)
        fake.cancelled.clear()
        s = c.generate_stream("x", max_new_tokens=200)
        next(s)
        s.cancel()
        assert fake.cancelled.wait(5)
        with pytest.raises(StopIteration):
            next(s)
        fake.cancelled.clear()
        for _ in c.generate_stream("x", max_new_tokens=200):
            break  # the dropped iterator cancels when collected (at once in CPython)
        assert fake.cancelled.wait(5)
        fake.cancelled.clear()
        list(c.generate_stream("x", max_new_tokens=3))
        time.sleep(0.2)
        assert not fake.cancelled.is_set()  # a stream read to its end is not cancelled


def test_deadline(fake):
    fake.sleep = 0.5
    with Client(f"127.0.0.1:{fake.port}", retry=FAST) as c:
        t = time.monotonic()
        with pytest.raises(DeadlineError):
            c.generate("x", timeout=0.1)
        assert time.monotonic() - t < 0.45
    with Client(f"127.0.0.1:{fake.port}", retry=FAST, timeout=0.1) as c:  # client-wide default
        with pytest.raises(DeadlineError):
            list(c.generate_stream("x", max_new_tokens=3))


def test_unreachable_server_is_unavailable_after_retries():
    with Client("127.0.0.1:1", retry=FAST) as c:
        with pytest.raises(UnavailableError):
            c.generate("x", timeout=5)
        assert not c.is_serving(timeout=1)


def test_async_client(fake):
    async def main():
        async with AsyncClient(f"127.0.0.1:{fake.port}", token="tok", retry=FAST) as c:
            fake.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]
            r = await c.generate([1, 2, 3], max_new_tokens=2)
            assert r.text == "ok" and fake.calls == 2 and list(fake.requests[-1].token_ids.ids) == [1, 2, 3]
            assert fake.metadata[-1]["authorization"] == "Bearer tok"
            fake.failures = [grpc.StatusCode.UNAVAILABLE]
            texts = [d.text async for d in c.generate_stream("x", max_new_tokens=2)]
            assert texts == ["t0", "t1"]
            assert (await c.generate_stream("x", max_new_tokens=2).collect()).finish_reason == "stop"
            fake.failures = [grpc.StatusCode.INVALID_ARGUMENT]
            with pytest.raises(ValidationError) as e:
                await c.chat([{"role": "user", "content": "x"}])
            assert e.value.field_violations[0][0] == "parameters.max_new_tokens"
            assert (await c.tokenize("ab")).token_ids == [2]
            assert (await c.model_info()).block_size == 16
            assert await c.health() == "SERVING"
            fake.stream_fail_after_first = True
            stream = c.generate_stream("x", max_new_tokens=3)
            assert (await stream.__anext__()).text == "t0"
            with pytest.raises(UnavailableError):
                await stream.__anext__()
            fake.sleep, fake.stream_fail_after_first = 0.05, False
            fake.cancelled.clear()
            async with c.generate_stream("x", max_new_tokens=200) as s:
                await s.__anext__()
            assert await asyncio.get_running_loop().run_in_executor(None, fake.cancelled.wait, 5)
            fake.sleep = 0.5
            with pytest.raises(DeadlineError):
                await c.generate("x", timeout=0.1)

    asyncio.run(main())


def test_public_api_names():
    for name in ("Client", "AsyncClient", "Result", "Delta", "FinalInfo", "Qwen2Error", "ValidationError",
                 "OverloadedError", "UnavailableError", "DeadlineError", "CancelledError", "ServerError",
                 "RetryPolicy"):
        assert hasattr(qwen2_client, name), name
    assert issubclass(ValidationError, Qwen2Error) and issubclass(ServerError, Qwen2Error)
