"""Shard failures lose nothing: a killed rank pauses the streams, the engine is rebuilt, and every stream
ends with exactly the tokens of an undisturbed run. Rebuilds that keep failing end requests UNAVAILABLE."""

import shutil
import threading
import time

import pytest
import ray

from qwen2_client import Client
from qwen2_client.errors import UnavailableError
from tests.server_process import InProcessServer

PROMPTS = [[5 + i, 17, 300 + 7 * i, 42, 9, 77 + i] for i in range(8)]
NEW_TOKENS = 48
KILL_AFTER = 4  # tokens every stream has before the kill: all 8 are mid-generation
RECOVERY = dict(restart_backoff_s=0.05, max_restarts=2, probe_interval_s=0.5)


def restarts(server: InProcessServer) -> float:
    return server.runner.metrics.registry.get_sample_value("qwen2_actor_restarts_total")


class HealthLog:
    """Polls health on a thread and keeps every change, so a short NOT_SERVING window is seen."""

    def __init__(self, target: str):
        self.client, self.seen, self._stop = Client(target), [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.02):
            status = self.client.health(timeout=5)
            if not self.seen or self.seen[-1] != status:
                self.seen.append(status)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        self.client.close()
        return self.seen


class Streams:
    """The 8 greedy streams at once, each on its own thread: tokens, arrival times, the error it ended with."""

    def __init__(self, target: str):
        self.target = target
        self.tokens = [[] for _ in PROMPTS]
        self.times = [[] for _ in PROMPTS]
        self.errors: list[Exception | None] = [None] * len(PROMPTS)
        self._lock = threading.Lock()

    def run(self, on_progress=lambda streams: None) -> "Streams":
        """on_progress(self) runs (under a lock) after every delta of every stream."""
        threads = [threading.Thread(target=self._one, args=(i, on_progress)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return self

    def _one(self, i: int, on_progress) -> None:
        try:
            with Client(self.target) as client:
                for delta in client.generate_stream(token_ids=PROMPTS[i], max_new_tokens=NEW_TOKENS,
                                                    temperature=0, ignore_eos=True):
                    with self._lock:
                        self.tokens[i] += delta.token_ids
                        self.times[i] += [time.monotonic()] * len(delta.token_ids)
                        on_progress(self)
        except Exception as e:  # noqa: BLE001 -- the test inspects it
            self.errors[i] = e


class KillWhenAllStarted:
    """on_progress: kill `rank`'s actor once every stream has KILL_AFTER tokens, and note when."""

    def __init__(self, server: InProcessServer, rank: int, before=lambda: None):
        self.server, self.rank, self.before, self.at = server, rank, before, None

    def __call__(self, streams: Streams) -> None:
        if self.at is None and all(len(t) >= KILL_AFTER for t in streams.tokens):
            self.before()
            ray.kill(self.server.runner.engine.actors[self.rank])
            self.at = time.monotonic()


@pytest.fixture(scope="module")
def undisturbed(checkpoints):
    """Module-wide: one server, and the tokens the 8 streams get from it with nothing killed."""
    server = InProcessServer(checkpoints["gqa-untied"], tp=2, max_num_seqs=8, **RECOVERY)
    try:
        streams = Streams(server.target).run()
        assert streams.errors == [None] * 8 and all(len(t) == NEW_TOKENS for t in streams.tokens)
        yield server, streams.tokens
    finally:
        server.stop()


def kill_mid_generation(server: InProcessServer, rank: int, expected: list[list[int]]) -> None:
    ranks = len(server.runner.engine.actors)
    before, health = restarts(server), HealthLog(server.target)
    kill = KillWhenAllStarted(server, rank)
    streams = Streams(server.target).run(kill)
    seen = health.stop()

    assert kill.at is not None, "the kill never happened: the streams finished before every one had started"
    assert streams.errors == [None] * 8, streams.errors
    assert streams.tokens == expected
    # every stream was cut mid-generation and went on after the rebuild
    assert all(ts[KILL_AFTER - 1] <= kill.at < ts[-1] for ts in streams.times)
    assert restarts(server) - before == ranks  # every rank of the engine is a new actor
    assert "NOT_SERVING" in seen and seen[-1] == "SERVING", seen
    recovery = max(next(t for t in ts if t > kill.at) for ts in streams.times) - kill.at
    print(f"\nrecovery ({ranks} ranks): every stream had its next token within {recovery:.2f}s of the kill")


def test_killed_rank_mid_generation_streams_finish_with_undisturbed_tokens(undisturbed):
    server, expected = undisturbed
    kill_mid_generation(server, 1, expected)


def test_killed_stage_with_steps_in_flight_under_pipeline_parallelism(undisturbed, checkpoints):
    """Two steps are in flight at PP 2: both are dropped and their sequences recomputed."""
    server = InProcessServer(checkpoints["gqa-untied"], tp=1, engine_options={"pp": 2}, max_num_seqs=8, **RECOVERY)
    try:
        kill_mid_generation(server, 0, undisturbed[1])
    finally:
        server.stop()


def test_rank_killed_while_idle_is_found_by_the_probe_and_rebuilt(undisturbed):
    server, expected = undisturbed
    before, health = restarts(server), HealthLog(server.target)
    ray.kill(server.runner.engine.actors[0])
    deadline = time.monotonic() + 120
    while restarts(server) == before and time.monotonic() < deadline:  # no request: only the probe can notice
        time.sleep(0.05)
    with Client(server.target) as client:
        client.wait_until_serving(timeout=60)
    seen = health.stop()
    assert restarts(server) - before == 2, "the idle probe did not find the dead rank"
    assert "NOT_SERVING" in seen and seen[-1] == "SERVING", seen
    assert Streams(server.target).run().tokens == expected


def test_rebuilds_that_keep_failing_end_requests_unavailable(checkpoints, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoints["gqa-untied"], model_dir)
    server = InProcessServer(model_dir, tp=2, max_num_seqs=8, **RECOVERY)
    try:
        # The weights vanish with the rank: every rebuild fails to load them.
        kill = KillWhenAllStarted(server, rank=1, before=lambda: [p.unlink() for p in model_dir.glob("*.safetensors")])
        streams = Streams(server.target).run(kill)
        assert kill.at is not None
        assert all(isinstance(e, UnavailableError) for e in streams.errors), streams.errors
        assert all(KILL_AFTER <= len(t) < NEW_TOKENS for t in streams.tokens)
        with Client(server.target) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(UnavailableError, match="engine"):
                client.generate(token_ids=PROMPTS[0], max_new_tokens=2, timeout=10)
        assert server.runner.metrics.registry.get_sample_value(
            "qwen2_requests_failed_total", {"kind": "unavailable", "api": "grpc"}) >= 8
    finally:
        server.stop()
