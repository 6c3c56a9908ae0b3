"""Run `qwen2-cluster serve` as a user would, in a subprocess on 127.0.0.1, and wait until it serves."""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.multiproc import free_port


class ServerProcess:
    # Ports are picked free, then bound by the server seconds later: meanwhile the kernel may hand one to an
    # outgoing connection (Ray's, gRPC's) as its local port. A start that lost its port that way is relaunched
    # on fresh ports, this many times at most.
    PORT_RETRIES = 3

    def __init__(self, model_dir=None, *flags: str, tp: int = 2):
        model = ["--model", str(model_dir)] if model_dir else []  # None: the built-in demo checkpoint
        self.args = ["serve", *model, "--host", "127.0.0.1", "--tensor-parallel-size", str(tp), "--rendezvous-host",
                     "127.0.0.1", "--cpus-per-rank", "0.5", "--block-size", "4", *flags]
        self.retries = self.PORT_RETRIES
        self._launch()

    def _launch(self) -> None:
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "qwen2-cluster"
        cmd = [str(exe), *self.args, "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--http-port", str(self.http_port)]
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def health(self) -> int | None:
        try:
            with grpc.insecure_channel(self.target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError:
            return None

    def wait_serving(self, timeout: float = 180) -> list[int]:
        """Poll health until SERVING; returns the statuses seen on the way (NOT_SERVING first, if seen)."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                if "Address already in use" in output and self.retries > 0:
                    self.retries -= 1
                    self.log.close()
                    self._launch()
                    continue
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{output}")
            status = self.health()
            if status is not None and (not seen or seen[-1] != status):
                seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return seen
            time.sleep(0.1)
        raise TimeoutError(f"server not serving after {timeout}s:\n{self.output()}")

    def metric(self, name: str) -> float:
        """A metric from the server's /metrics, summed over its labels (api, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            lines = [line for line in r.read().decode().splitlines() if line.startswith((name + " ", name + "{"))]
        assert lines, f"{name} not exported"
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class InProcessServer:
    """The same server in this process, its event loop on a thread, so tests can inspect the scheduler.
    `http=True`: the OpenAI HTTP API too, at `http_url`."""

    def __init__(self, model_dir, tp: int = 2, server_options: dict | None = None, engine_options: dict | None = None,
                 limits_options: dict | None = None, http: bool = False, **runner_limits):
        import asyncio
        import threading

        from cluster.engine import Engine
        from router.runner import Runner
        from router.server import Server, ServerConfig
        from router.service import ServingCore
        from router.tokenizer import Tokenizer
        from router.validation import Defaults, Limits
        from tests.engine_scenarios import engine_config

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        engine = Engine(engine_config(model_dir, tp, **({"max_num_blocks": None, "kv_cache_bytes": 8 * 2**20,
                                                         "cpus_per_rank": 0.5} | (engine_options or {}))))
        engine.init_ray()  # before the gRPC server's threads (see init_ray)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        self.runner = Runner(engine, tokenizer, **runner_limits)
        limits = Limits(**{"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
                           "max_new_tokens": 512} | (limits_options or {}))

        async def build():  # grpc.aio servers belong to the loop they are created on
            options = dict(server_options or {})
            core = ServingCore(self.runner, tokenizer, Defaults.from_pretrained(model_dir), limits,
                               options.pop("rope_scaling_mode", "per-request"))
            http_port = {"http_port": free_port()} if http else {}
            return Server(core, ServerConfig(port=free_port(), **http_port, **options), model_name="test")

        self.server = self.call(build())
        self.target = f"127.0.0.1:{self.server.port}"
        self.call(self.server.start(), timeout=180)
        self.http_url = f"http://127.0.0.1:{self.server.http.port}" if http else None

    def call(self, coro, timeout: float = 60):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(drain_timeout_s=5), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
