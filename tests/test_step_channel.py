"""The step channel between the router and the ranks' loops (cluster/channel.py), ranks played by threads."""

import asyncio
import pickle
import socket
import threading

import pytest

from cluster.channel import HEADER, ChannelClosed, StepChannel, rank_loop


def start_ranks(address, token, execute, ranks):
    threads = [threading.Thread(target=rank_loop, args=(address, token, r, lambda *step, r=r: execute(r, *step)),
                                daemon=True) for r in range(ranks)]
    for t in threads:
        t.start()
    return threads


def test_steps_in_flight_come_back_in_order_with_each_ranks_reply():
    async def scenario():
        channel = StepChannel(2)
        address = await channel.open("127.0.0.1")
        threads = start_ranks(address, channel.token, lambda rank, seqs, forget: (rank, seqs, forget), 2)
        await channel.connected(10)
        steps = [channel.submit(([i] * 3, [i])) for i in range(5)]  # five in flight before any reply is read
        replies = [[await f for f in futures] for futures in steps]
        await channel.close()
        for t in threads:
            t.join(10)
        return replies, [t.is_alive() for t in threads]

    replies, alive = asyncio.run(scenario())
    assert replies == [[(0, [i] * 3, [i]), (1, [i] * 3, [i])] for i in range(5)]
    assert alive == [False, False]  # closing the channel ends the ranks' loops


def test_a_raising_step_is_its_ranks_reply_and_the_loop_goes_on():
    def execute(rank, seqs, forget):
        if rank == 1 and seqs == "bad":
            raise ValueError("sequence 3: no such block")
        return seqs

    async def scenario():
        channel = StepChannel(2)
        address = await channel.open("127.0.0.1")
        start_ranks(address, channel.token, execute, 2)
        await channel.connected(10)
        bad = [await f for f in channel.submit(("bad", []))]
        good = [await f for f in channel.submit(("good", []))]
        await channel.close()
        return bad, good

    bad, good = asyncio.run(scenario())
    assert bad[0] == "bad" and isinstance(bad[1], ValueError) and "no such block" in str(bad[1])
    assert good == ["good", "good"]


def test_a_dropped_rank_fails_its_waiting_steps_and_later_submissions():
    release = threading.Event()

    def execute(rank, seqs, forget):
        release.wait(10)
        return seqs

    async def scenario():
        channel = StepChannel(2)
        address = await channel.open("127.0.0.1")
        start_ranks(address, channel.token, execute, 1)  # rank 0 by the loop, rank 1 by hand
        impostor = socket.create_connection(address)
        impostor.sendall(HEADER.pack(len(p := pickle.dumps((channel.token, 1)))) + p)
        await channel.connected(10)
        futures = channel.submit(("step", []))
        impostor.close()  # rank 1 dies with the step in flight
        with pytest.raises(ChannelClosed, match="rank 1"):
            await asyncio.wait_for(futures[1], 10)
        with pytest.raises(ChannelClosed):
            channel.submit(("next", []))
        release.set()
        await channel.close()

    asyncio.run(scenario())


def test_a_connection_without_the_token_is_refused():
    async def scenario():
        channel = StepChannel(1)
        address = await channel.open("127.0.0.1")
        stranger = socket.create_connection(address)
        stranger.sendall(HEADER.pack(len(p := pickle.dumps(("guess", 0)))) + p)
        refused = await asyncio.to_thread(stranger.recv, 1)  # the router hangs up: b""
        with pytest.raises(asyncio.TimeoutError):
            await channel.connected(0.2)
        start_ranks(address, channel.token, lambda rank, seqs, forget: seqs, 1)
        await channel.connected(10)
        reply = await channel.submit(("ok", []))[0]
        await channel.close()
        return refused, reply

    assert asyncio.run(scenario()) == (b"", "ok")
