"""Load: 256 streams held at once on `tiny`, refusal beyond the queue bound, cancellations, and no leak.

One round: HOLDERS long streams fill every running slot (max_num_seqs) and stay there until cancelled, so
the QUEUED streams opened next wait, and the waiting queue is exactly at max_waiting. The state is then
stable (nothing can finish or be admitted), so requests beyond the bound must be refused, with no timing
involved. Then some queued streams are cancelled while waiting, the holders are cancelled mid-stream, some
queued ones are cancelled after their first token, and the rest must complete with their exact token count.
"""

import asyncio
import gc
import sys
import time

import grpc
import pytest

from qwen2_client.proto import serving_pb2 as pb
from qwen2_client.proto import serving_pb2_grpc as pb_grpc
from router.runner import Request
from router.scheduler import Sequence
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.server_process import InProcessServer

HOLDERS, QUEUED, EXTRA = 32, 224, 16  # HOLDERS + QUEUED = 256 streams held at once
NEW_TOKENS, LONG_TOKENS, HOLD_TOKENS = 8, 64, 4000
CANCEL_WAITING, CANCEL_STREAMING = 7, 11  # every 7th queued stream cancelled while waiting, every 11th after a token


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset_config("tiny"), seed=3)
    # 16 MiB of KV at 1 KiB a token and 4 tokens a block: 4096 blocks, so no preemption muddles the counts.
    s = InProcessServer(model_dir, tp=1, engine_options={"kv_cache_bytes": 16 * 2**20},
                        limits_options={"max_new_tokens": HOLD_TOKENS},
                        max_num_seqs=HOLDERS, max_num_batched_tokens=512, max_waiting=QUEUED)
    yield s
    s.stop()


def request(i: int, new_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=f"load {i}", parameters=pb.GenerationParameters(
        max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))


async def until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def drain(call) -> tuple[list[int], pb.FinalInfo | None]:
    ids, final = [], None
    async for msg in call:
        ids += msg.token_ids
        if msg.HasField("final"):
            final = msg.final
    return ids, final


async def one_round(server) -> dict:
    """One round of load; returns its figures. Every assertion about correctness is made here."""
    runner = server.runner
    scheduler = runner.scheduler
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        holders = [stub.GenerateStream(request(i, HOLD_TOKENS)) for i in range(HOLDERS)]
        for call in holders:  # each has a token: all running, and each has a long way to go
            assert (await call.read()).token_ids
        queued = [stub.GenerateStream(request(HOLDERS + i, LONG_TOKENS if i % CANCEL_STREAMING == 0 else NEW_TOKENS))
                  for i in range(QUEUED)]
        await until(lambda: scheduler.num_waiting == QUEUED, "every queued stream to wait")
        held = len(runner.requests)
        assert held == HOLDERS + QUEUED and scheduler.num_running == HOLDERS

        refused = 0
        for i in range(EXTRA):
            call = stub.GenerateStream(request(-i, NEW_TOKENS))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()  # the refusal is the first thing back: no token before it
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
            refused += 1

        waiting_cancelled = [c for i, c in enumerate(queued) if i % CANCEL_WAITING == 1]
        for call in waiting_cancelled:
            call.cancel()
        await until(lambda: scheduler.num_waiting == QUEUED - len(waiting_cancelled),
                    "cancelled waiting streams to leave the queue")
        for call in holders:
            call.cancel()

        async def consume(i, call):
            if call in waiting_cancelled:
                return "cancelled"
            if i % CANCEL_STREAMING == 0:  # LONG_TOKENS to go: cancelled well before its end
                assert (await call.read()).token_ids
                call.cancel()
                return "cancelled"
            ids, final = await drain(call)
            assert len(ids) == NEW_TOKENS and final.usage.generated_tokens == NEW_TOKENS
            assert final.finish_reason == pb.FINISH_REASON_LENGTH
            return "completed"

        outcomes = await asyncio.gather(*(consume(i, c) for i, c in enumerate(queued)))
    await until(lambda: not runner.requests, "the server to forget every request")
    assert scheduler.num_running == scheduler.num_waiting == 0
    assert scheduler.blocks.num_free == scheduler.blocks.num_total
    return dict(held=held, refused=refused, completed=outcomes.count("completed"),
                cancelled=outcomes.count("cancelled") + HOLDERS, blocks_free=scheduler.blocks.num_free,
                blocks_total=scheduler.blocks.num_total)


def rss_mib() -> float:
    """This process's resident memory: the router runs here (the shards are Ray worker processes)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def live(*classes) -> int:
    return sum(type(o) in classes for o in gc.get_objects())


def footprint() -> tuple[float, int]:
    gc.collect()
    return rss_mib(), sys.getallocatedblocks()


def test_256_streams_refusals_cancellations_and_no_leak(server):
    began = time.monotonic()
    first = asyncio.run(one_round(server))  # warms every pool and cache the router keeps for good
    rss_0, blocks_0 = footprint()
    rounds = [asyncio.run(one_round(server)) for _ in range(2)]
    rss_1, blocks_1 = footprint()
    print(f"\nload: {first}; then {rounds}; RSS {rss_0:.1f} -> {rss_1:.1f} MiB, Python blocks "
          f"{blocks_0} -> {blocks_1}, {time.monotonic() - began:.1f}s")
    cancelled_waiting = len(range(1, QUEUED, CANCEL_WAITING))
    cancelled_streaming = sum(1 for i in range(0, QUEUED, CANCEL_STREAMING) if i % CANCEL_WAITING != 1)
    assert first == rounds[0] == rounds[1] == dict(
        held=256, refused=EXTRA, completed=QUEUED - cancelled_waiting - cancelled_streaming,
        cancelled=HOLDERS + cancelled_waiting + cancelled_streaming, blocks_free=4096, blocks_total=4096)
    # 768 streams and 48 refusals went by; a leak would keep hundreds of requests. The few left are the last
    # ones still named by the engine loop's locals and by the last refusal's traceback.
    assert live(Request, Sequence) <= 3
    # The 512 streams of the last two rounds left +331 Python memory blocks in a measured run; one leaked
    # request (Request, Sequence, token lists, event queue, detokenizer) is dozens, so 512 of them are >10,000.
    assert blocks_1 - blocks_0 < 2_500, (blocks_0, blocks_1)
    # RSS is coarse (glibc arenas, gRPC's buffers move by megabytes; measured: it fell 47 MiB): it is here for
    # what the Python count cannot see, a native leak of 32 KiB or more a stream, such as a gRPC call's buffers.
    assert rss_1 - rss_0 < 16, (rss_0, rss_1)
