"""`qwen2-cluster serve` as a process, driven by the SDK and `qwen2-client`: the README's two terminals."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from qwen2_client import (AsyncClient, Client, DeadlineError, OverloadedError, Qwen2Error, RetryPolicy,
                          UnavailableError, ValidationError)
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def served(cache_home):
    """The demo server exactly as the README starts it (no --model), plus test-only loopback flags."""
    os.environ["XDG_CACHE_HOME"] = str(cache_home)
    try:
        server = ServerProcess(None, "--max-waiting", "2", "--max-num-seqs", "2", tp=2)
        statuses = server.wait_serving()
        yield server, statuses
    finally:
        os.environ.pop("XDG_CACHE_HOME", None)
        if "server" in locals():
            server.stop()


def test_health_goes_from_not_serving_to_serving(served, cache_home):
    server, statuses = served
    assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses  # listening while the engine loaded
    assert (cache_home / "qwen2-cluster" / "demo-tiny" / "config.json").is_file()
    assert f"qwen2-client --target {server.target}" in server.output()  # it says how to call it


def test_qwen2_client_cli_answers(served):
    server, _ = served
    exe = Path(sys.executable).parent / "qwen2-client"
    out = subprocess.run([str(exe), "--target", server.target, "generate", "Hello", "--max-new-tokens", "5",
                          "--logprobs", "2", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) == len(result["logprobs"]) <= 5
    assert result["finish_reason"] in ("length", "eos") and result["usage"]["prompt_tokens"] == 1
    assert all(len(lp["top"]) == 2 for lp in result["logprobs"])
    bad = subprocess.run([str(exe), "--target", server.target, "generate", "Hello", "--top-p", "2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "top_p" in bad.stderr


def test_sdk_calls_and_typed_errors(served):
    server, _ = served
    with Client(server.target) as client:
        assert client.health() == "SERVING"
        info = client.model_info()
        assert info.tensor_parallel_size == 2
        result = client.generate("Hello world", max_new_tokens=6, temperature=0, ignore_eos=True)
        streamed = list(client.generate_stream("Hello world", max_new_tokens=6, temperature=0, ignore_eos=True))
        assert "".join(d.text for d in streamed) == result.text
        assert [t for d in streamed for t in d.token_ids] == result.token_ids
        assert streamed[-1].final.finish_reason == "length" and result.usage.generated_tokens == 6
        chat = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3, ignore_eos=True)
        assert chat.usage.prompt_tokens == len(client.tokenize(messages=[{"role": "user", "content": "Hi"}]).token_ids)
        with pytest.raises(ValidationError) as e:
            client.generate("x", temperature=-1.0, top_p=0.0)
        assert {f for f, _ in e.value.field_violations} == {"parameters.temperature", "parameters.top_p"}
        with pytest.raises(DeadlineError):
            client.generate("x", max_new_tokens=400, ignore_eos=True, timeout=0.3)


def test_full_queue_gives_overloaded_and_retries_wait_it_out(served):
    server, _ = served
    with Client(server.target, retry=RetryPolicy(max_attempts=1)) as client:
        # Two running (max_num_seqs=2) and two waiting (max_waiting=2) fill the queue.
        holders = [client.generate_stream("hold", max_new_tokens=1000, ignore_eos=True) for _ in range(4)]
        outcomes = []

        def read(stream):
            try:
                outcomes.append(sum(1 for _ in stream))
            except Qwen2Error as e:
                outcomes.append(type(e))

        readers = [threading.Thread(target=read, args=(h,), daemon=True) for h in holders]
        for r in readers:
            r.start()
            time.sleep(0.3)  # one at a time, so that the first two are running before the others queue
        time.sleep(0.5)
        with pytest.raises(OverloadedError):
            client.generate("one too many", max_new_tokens=2)
        patient = Client(server.target, retry=RetryPolicy(max_attempts=100, base_delay=0.05, max_delay=0.3))
        with patient:
            threading.Timer(1.0, lambda: [h.cancel() for h in holders]).start()
            assert patient.generate("eventually", max_new_tokens=2, ignore_eos=True).usage.generated_tokens == 2
        for r in readers:
            r.join(10)
    assert OverloadedError not in outcomes  # the four holders fitted: 2 running + 2 waiting


def test_async_client(served):
    server, _ = served

    async def scenario():
        async with AsyncClient(server.target) as client:
            results = await asyncio.gather(*(client.generate(f"p{i}", max_new_tokens=4, seed=i, temperature=1.0,
                                                             ignore_eos=True) for i in range(2)))
            deltas = [d async for d in client.generate_stream("stream", max_new_tokens=3, ignore_eos=True)]
            return results, deltas

    results, deltas = asyncio.run(scenario())
    assert all(r.usage.generated_tokens == 4 for r in results) and deltas[-1].final is not None


def test_sigterm_under_load_drains_every_admitted_request(cache_home, served):
    """12 streams, 4 running and 8 queued, when SIGTERM lands: every one ends complete, later ones are refused."""
    server, _ = served  # the demo checkpoint is in the cache already
    os.environ["XDG_CACHE_HOME"] = str(cache_home)
    try:
        drain = ServerProcess(None, "--drain-timeout", "60", "--max-num-seqs", "4", tp=1)
    finally:
        os.environ.pop("XDG_CACHE_HOME", None)

    async def scenario():
        async with AsyncClient(drain.target, retry=RetryPolicy(max_attempts=1)) as client:
            streams = [client.generate_stream(f"drain me {i}", max_new_tokens=60, ignore_eos=True) for i in range(12)]
            results = [asyncio.ensure_future(collect(s)) for s in streams]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # all 12 admitted, and the gauges (set after a step) show a queue
                queued = drain.metric("qwen2_waiting_requests")
                if drain.metric("qwen2_requests_received_total") == 12 and queued >= 1:
                    break
                await asyncio.sleep(0.02)
            drain.proc.send_signal(signal.SIGTERM)
            while await client.health() != "NOT_SERVING":
                await asyncio.sleep(0.02)
            with pytest.raises(UnavailableError):  # draining: nothing new is admitted
                await client.generate("too late", max_new_tokens=2)
            return queued, await asyncio.gather(*results)

    async def collect(stream):
        return [d async for d in stream]

    try:
        drain.wait_serving()
        queued, results = asyncio.run(scenario())
        assert queued >= 1  # the drain has queued requests to finish, not only running ones
        assert [deltas[-1].final.finish_reason for deltas in results] == ["length"] * 12
        assert [sum(len(d.token_ids) for d in deltas) for deltas in results] == [60] * 12
        assert drain.proc.wait(60) == 0
    finally:
        drain.stop()


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray's GCS, raylet and workers, the ranks among them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rank_pid(server: ServerProcess) -> int:
    for pid in _descendants(server.proc.pid):
        try:
            if b"ShardActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError("no ShardActor process under the server")


def _assert_clean_exit(server: ServerProcess, processes: set[int]) -> None:
    assert server.proc.wait(90) == 0, server.output()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in processes if _alive(p)], "Ray processes outlived the server"
    out = server.output()
    assert "Traceback" not in out and "core dumped" not in out and "Aborted" not in out, out


@pytest.mark.parametrize("moment", ["while the engine starts", "while idle", "while the engine is rebuilt"])
def test_sigterm_at_any_moment_exits_cleanly(cache_home, served, moment):
    """Exit 0, no traceback, every Ray process (ranks included) gone, an open stream ended rather than hung."""
    os.environ["XDG_CACHE_HOME"] = str(cache_home)  # the demo checkpoint is in the cache already
    try:
        server = ServerProcess(None, "--drain-timeout", "5", tp=1)
    finally:
        os.environ.pop("XDG_CACHE_HOME", None)
    stream_ended = threading.Event()
    try:
        if moment == "while the engine starts":
            deadline = time.monotonic() + 120
            while "gRPC listening" not in server.output() or not _descendants(server.proc.pid):
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.05)
            assert server.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        else:
            server.wait_serving()
        if moment == "while the engine is rebuilt":
            def stream():
                try:
                    with Client(server.target, retry=RetryPolicy(max_attempts=1)) as client:
                        for _ in client.generate_stream("long", max_new_tokens=4000, ignore_eos=True, timeout=120):
                            pass
                except Qwen2Error:
                    pass
                stream_ended.set()

            threading.Thread(target=stream, daemon=True).start()
            time.sleep(1)
            os.kill(_rank_pid(server), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while server.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.02)
        processes = _descendants(server.proc.pid)
        server.proc.send_signal(signal.SIGTERM)
        _assert_clean_exit(server, processes)
        if moment == "while the engine is rebuilt":
            assert stream_ended.wait(30)
    finally:
        server.stop()
