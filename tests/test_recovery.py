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
            self._record()

    def _record(self):
        status = self.client.health(timeout=5)
        if not self.seen or self.seen[-1] != status:
            self.seen.append(status)

    def stop(self) -> list[str]:
        """Ends polling with one last look, so a change just before the stop is not missed."""
        self._stop.set()
        self._thread.join()
        self._record()
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


class FailStepResults:
    """on_progress: once every stream has KILL_AFTER tokens, make the router's result path raise (as
    Scheduler.complete does on results it cannot apply), `times` times in a row."""

    def __init__(self, server: InProcessServer, times: int = 1, also_requeue: bool = False):
        self.server, self.times, self.also_requeue, self.at = server, times, also_requeue, None

    def __call__(self, streams: Streams) -> None:
        if self.at is not None or not all(len(t) >= KILL_AFTER for t in streams.tokens):
            return
        scheduler = self.server.runner.scheduler
        complete, left = scheduler.complete, [self.times]

        def faulty(plans, results):
            if left[0] > 0:
                left[0] -= 1
                raise ValueError("injected fault in the result path")
            return complete(plans, results)

        def faulty_requeue():
            raise RuntimeError("injected fault while recovering")

        scheduler.complete = faulty
        if self.also_requeue:
            scheduler.requeue_all = faulty_requeue
        self.at = time.monotonic()


def failures(server: InProcessServer, cause: str) -> float:
    return server.runner.metrics.registry.get_sample_value("qwen2_engine_failures_total", {"cause": cause})


def test_a_bug_in_the_result_path_rebuilds_the_engine_and_streams_go_on(undisturbed):
    server, expected = undisturbed
    before, health = failures(server, "internal"), HealthLog(server.target)
    fault = FailStepResults(server)
    streams = Streams(server.target).run(fault)
    seen = health.stop()
    del server.runner.scheduler.complete  # the instance attribute: back to the class's method
    assert fault.at is not None
    assert streams.errors == [None] * 8, streams.errors
    assert streams.tokens == expected
    assert failures(server, "internal") - before == 1
    assert "NOT_SERVING" in seen and seen[-1] == "SERVING", seen


@pytest.mark.parametrize("fault", ["every step", "recovery too"])
def test_an_engine_loop_that_cannot_go_on_ends_every_request_and_health(checkpoints, fault):
    """A fault on every step exhausts the restarts; a fault in recovery itself ends the loop task. Either
    way no stream hangs: each ends UNAVAILABLE, health is NOT_SERVING, new requests are refused."""
    server = InProcessServer(checkpoints["gqa-untied"], tp=1, max_num_seqs=8, **RECOVERY)
    try:
        streams = Streams(server.target).run(FailStepResults(server, times=10**6, also_requeue=fault == "recovery too"))
        assert all(isinstance(e, UnavailableError) for e in streams.errors), streams.errors
        with Client(server.target) as client:
            deadline = time.monotonic() + 5  # health follows the runner within its 0.1 s watch
            while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.health() == "NOT_SERVING"
            with pytest.raises(UnavailableError, match="engine"):
                client.generate(token_ids=PROMPTS[0], max_new_tokens=2, timeout=10)
        assert server.runner.metrics.registry.get_sample_value("qwen2_engine_loop_running") == 0
    finally:
        server.stop()


def test_a_slow_step_is_not_taken_for_a_dead_rank(undisturbed):
    """The liveness probe answers beside a running step: a step far longer than the probe timeout, but
    within the step timeout, completes without a rebuild."""
    server, expected = undisturbed
    engine = server.runner.engine
    before, probe_timeout = restarts(server), engine.config.probe_timeout_s
    engine.config.probe_timeout_s = 0.3
    try:
        def stall_next_step(actor) -> None:  # on the rank: its next step sleeps 3 s first
            execute = actor.worker.execute

            def slow(*args):
                del actor.worker.execute  # once
                time.sleep(3)
                return execute(*args)

            actor.worker.execute = slow

        def stall_a_rank(streams: Streams) -> None:
            if not hasattr(stall_a_rank, "at") and all(len(t) >= KILL_AFTER for t in streams.tokens):
                stall_a_rank.at = time.monotonic()
                engine.actors[1].__ray_call__.remote(stall_next_step)

        streams = Streams(server.target).run(stall_a_rank)
    finally:
        engine.config.probe_timeout_s = probe_timeout
    assert streams.errors == [None] * 8 and streams.tokens == expected
    assert max(b - a for ts in streams.times for a, b in zip(ts, ts[1:])) > 2.5  # the stall did happen
    assert restarts(server) == before
