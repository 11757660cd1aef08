"""``serve --workers N``: one engine process, N websocket worker processes on one port.

Streams through any worker equal the offline forward and share the engine's model calls; a
stream resumes on whichever worker its reconnection lands on; a killed worker loses only its
own streams (a canary on another worker stays exact; with a state dir they resume from their
write-ahead) and is started again; health and metrics count the whole server; the CLI shuts
down on SIGTERM with every stream parked, and a new server resumes them.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import pytest
from streamssm.service.client import StreamClient
from streamssm.service.config import ServeConfig
from streamssm.service.link import queue_result
from streamssm.service.multiprocess import MultiProcessServer
from test_service_server import (
    _export,
    http_get,
    offline_dna,
    random_bases,
    random_cuts,
    read_error,
    server,
    stream_dna,
)
from websockets.asyncio.client import connect

from streamssm.checkpoint import load_for_serving
from streamssm.encoding import encode_bases
from streamssm.errors import ConfigError
from streamssm.models import ModelConfig

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def dna(tmp_path_factory):
    small = dict(d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=4)
    cfg = ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", **small)
    return _export(tmp_path_factory.mktemp("ckpt"), "dna", cfg, {"modality": "dna"}, 1)


def workers(path, n=2, **kw) -> MultiProcessServer:
    kw.setdefault("port", 0)
    kw.setdefault("ping_interval", None)
    return MultiProcessServer(load_for_serving(path), ServeConfig(workers=n, **kw))


def assert_exact(path, bases, client):
    logp, scores = offline_dna(path, bases)
    np.testing.assert_allclose(client.outputs(), logp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(client.scores(), scores, atol=2e-5, rtol=0)
    assert [r.seq for r in client.results] == list(range(len(client.results)))


def per_worker(metrics_text: str) -> dict[str, float]:
    """streamssm_worker_streams_total by worker index."""
    return {m[1]: float(m[2]) for m in re.finditer(r'streamssm_worker_streams_total\{worker="(\d+)"\} (\S+)',
                                                    metrics_text)}


ARRAYS = [np.arange(6, dtype=np.int64), np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3),
          np.arange(20, dtype=np.float32)[::2], np.zeros((0, 5), np.float32)]


@pytest.mark.parametrize(("flush_delay", "messages"), [(0.0, [[0], [1], [2]]), (0.05, [[0, 1, 2]])])
async def test_a_flush_delay_sends_the_chunks_of_several_loop_turns_as_one_message(flush_delay, messages):
    """A worker's clients' frames arrive one loop turn apart; one link message per chunk cost the
    engine process ~30 % more CPU a chunk (bench_engine_process --pace-ms 20). With a flush delay
    the chunks queued within it leave as one "chunks" message, in order."""
    import socket

    from streamssm.service.link import Link, queue_chunk

    a, b = socket.socketpair()
    sender, receiver = await Link.over(a, flush_delay=flush_delay), await Link.over(b)
    for seq in range(3):
        queue_chunk(sender, 7, seq, 4 * seq, np.full(4, seq, np.int64), 0.0)
        await asyncio.sleep(0)  # the next frame arrives in a later loop turn
    await asyncio.sleep(2 * flush_delay + 0.01)  # the delayed flush leaves on its own
    await sender.close()
    got = [message async for message in receiver.messages()]
    assert [m[2] for m in got] == messages and all(m[0] == "chunks" and m[1] == [7] * len(m[2]) for m in got)
    assert [x.tolist() for m in got for x in m[6]] == [[seq] * 4 for seq in range(3)]
    await receiver.close()


@contextlib.asynccontextmanager
async def _linked(worker_delay: float, engine_delay: float = 0.0):
    """A worker link (flush delay ``worker_delay`` s) to an engine link that answers every call
    with the sum of its arguments; yields (worker, kinds of the messages the engine got, in order)."""
    import socket

    from streamssm.service.link import Link

    a, b = socket.socketpair()
    worker, engine = await Link.over(a, flush_delay=worker_delay), await Link.over(b, flush_delay=engine_delay)
    seen = []

    async def answer():
        async for message in engine.messages():
            seen.append(message[0])
            if message[0] == "call":
                engine.reply(message[1], sum(message[3]))

    loop = asyncio.get_running_loop()
    serving = loop.create_task(answer())
    reading = loop.create_task(anext(worker.messages(), None))  # resolves the replies
    yield worker, seen
    await worker.close()
    await serving
    await engine.close()
    assert await reading is None


async def test_a_flush_delay_does_not_hold_calls_and_replies():
    """Defect: a worker link's flush delay (for its chunks) also held its control calls (open,
    close, snapshot) and their replies, each up to the delay. A call on a link whose flushes
    wait 30 s is answered at once; a chunk queued before it leaves with it, in order."""
    from streamssm.service.link import queue_chunk

    async with _linked(30.0, 30.0) as (worker, seen):
        queue_chunk(worker, 7, 0, 0, np.zeros(4, np.int64), 0.0)
        async with asyncio.timeout(5):
            assert await worker.call("add", 2, 3) == 5
        assert seen == ["chunks", "call"]


async def test_messages_after_an_early_flush_wait_their_own_flush_delay():
    """A call flushes a delayed link at once; the flush that was scheduled for the chunk queued
    before it is cancelled, so a chunk queued later still waits its full delay (the stale timer
    used to send it at the first chunk's deadline)."""
    from streamssm.service.link import queue_chunk

    async with _linked(1.0) as (worker, got):
        queue_chunk(worker, 7, 0, 0, np.zeros(4, np.int64), 0.0)  # its flush: due in 1 s
        await worker.call("ping")  # leaves at once, with the chunk
        await asyncio.sleep(0.6)
        queue_chunk(worker, 7, 1, 4, np.zeros(4, np.int64), 0.0)  # due 1 s from now, not at the first's deadline
        await asyncio.sleep(0.6)
        assert got == ["chunks", "call"]
        async with asyncio.timeout(5):
            while len(got) < 3:
                await asyncio.sleep(0.05)
        assert got == ["chunks", "call", "chunks"]


def test_a_link_whose_other_process_died_drops_what_it_sends_under_uvloop():
    """Defect: the engine kept sending (results, ``live``) to a dead worker until its link's reader
    saw the EOF; under uvloop (serve's default loop) each flush after the first failed write raised
    RuntimeError (an "Exception in callback Link._flush" traceback per flush in the engine's log,
    on every worker death under load). A link to a dead process drops what it sends, quietly."""
    import socket

    import uvloop

    from streamssm.service.link import Link

    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx.get("exception")))
        a, b = socket.socketpair()
        link = await Link.over(a)
        b.close()  # the worker is gone; nothing has read the link's EOF yet
        for _ in range(3):
            link.send("live", 1)
            await asyncio.sleep(0.05)
        await link.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert errors == []


@pytest.mark.parametrize("array", ARRAYS)
@pytest.mark.parametrize("tensors", [False, True])
def test_arrays_cross_a_link_as_one_buffer_exactly(array, tensors):
    """Link messages carry a batch of arrays as one buffer (an array's own pickling costs ~3-5 us,
    once per chunk and per result in the engine process): same values, dtype and shape back,
    writable (torch.from_numpy warns on read-only arrays), strided views, empty arrays and None
    included; an array of another dtype or trailing shape does not join the batch."""
    import pickle

    from streamssm.service.link import ArrayBatch

    batch = ArrayBatch(tensors)
    assert batch.add(array)
    batch.items.append(None)  # as the engine's results hold a scores-only stream's outputs
    assert batch.add(array[:0]) and batch.add(array)
    assert not batch.add(array.astype(np.float64)) and not batch.add(np.zeros((len(array), 7), array.dtype))
    back = pickle.loads(pickle.dumps(batch, protocol=5))
    assert len(back) == 4 and back[1] is None
    for got, want in zip((back[0], back[2], back[3]), (array, array[:0], array)):
        assert isinstance(got, torch.Tensor if tensors else np.ndarray)
        got = got.numpy() if tensors else got
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.writeable
    assert pickle.loads(pickle.dumps(ArrayBatch(tensors))) == ()
    only_none = ArrayBatch(tensors)
    only_none.items.append(None)
    assert pickle.loads(pickle.dumps(only_none)) == (None,)


async def test_streams_through_workers_equal_offline_forward(dna):
    async with workers(dna, max_streams=20) as srv:
        seqs = [random_bases(20 + 3 * i, seed=i) for i in range(16)]
        runs = await asyncio.gather(*(stream_dna(srv.url, s, seed=50 + i) for i, s in enumerate(seqs)))
        status, _, text = await http_get(srv.url.replace("ws://", "http://") + "metrics")
        health = json.loads((await http_get(srv.url.replace("ws://", "http://") + "healthz"))[2])
        batches = srv.scheduler.batches
    for bases, (client, summary) in zip(seqs, runs):
        assert_exact(dna, bases, client)
        assert summary["samples"] == len(bases)
    assert batches < sum(len(c.results) for c, _ in runs)  # streams of both workers shared model calls
    assert status == 200 and set(per_worker(text)) == {"0", "1"}  # the kernel spread the connections
    assert sum(per_worker(text).values()) == 16
    assert re.search(r"^streamssm_connections_total 16\.0$", text, re.M), text  # counted by both workers
    assert health["live_streams"] == 0 and health["max_streams"] == 20


async def test_a_stream_resumes_on_whichever_worker_it_reconnects_to(dna):
    bases = random_bases(240, seed=7)
    cuts = random_cuts(len(bases), 8)
    aborts = set(range(1, len(cuts) - 1, 3))  # >= 14 dropped connections: both workers see this stream
    async with workers(dna) as srv:
        async with StreamClient(srv.url, format="text", window=4, reconnect=4) as c:
            for i, (a, b) in enumerate(cuts):
                await c.send(bases[a:b])
                if i in aborts:
                    c._ws.transport.abort()
            await c.end(timeout=TIMEOUT)
        text = (await http_get(srv.url.replace("ws://", "http://") + "metrics"))[2]
    assert c.reconnects >= 14
    assert set(per_worker(text)) == {"0", "1"}  # one stream, opened on both workers
    assert_exact(dna, bases, c)


async def test_a_killed_worker_loses_only_its_streams_and_comes_back(dna):
    bases = random_bases(80, seed=11)
    async with workers(dna) as srv:
        canary = StreamClient(srv.url, format="text", reconnect=0)
        await canary.__aenter__()
        await canary.send(bases[:20])
        home = next(i for i, w in srv.workers.items() if w.relays)
        victims = []
        while not any(w.relays for i, w in srv.workers.items() if i != home):  # a stream on the other worker
            victims.append(StreamClient(srv.url, format="text", reconnect=0))
            await victims[-1].__aenter__()
            await victims[-1].send("ACGT")
        other = next(i for i in srv.workers if i != home)
        dead = srv.workers[other].process
        dead.send_signal(signal.SIGKILL)
        for a in range(20, 80, 10):  # the canary goes on meanwhile
            await canary.send(bases[a : a + 10])
        await canary.end(timeout=TIMEOUT)
        await canary.close()
        async with asyncio.timeout(TIMEOUT):
            while other not in srv.workers or srv.workers[other].process is dead or \
                    not srv.workers[other].listening.done() or srv.scheduler.live > len(victims) - 1:
                await asyncio.sleep(0.05)
        assert srv.workers[other].process.pid != dead.pid  # started again
        assert srv.scheduler.live == len(victims) - 1  # the dead worker's one stream freed its pool row
        after, _ = await stream_dna(srv.url, random_bases(30, seed=12), seed=13)  # still serving
        for v in victims:
            await v.close()
    assert_exact(dna, bases, canary)
    assert after.results


async def test_a_frozen_worker_is_killed_and_started_again(dna):
    """Defect: a worker that stopped answering (SIGSTOP, a stuck loop) stayed in place for good: the
    kernel kept handing it its share of new connections, which hung (7 of 10 in one trial), and its
    streams kept their pool rows. The engine's watchdog kills a worker that does not
    answer its ping in time; it is started again like a crashed one."""
    bases = random_bases(30, seed=17)
    srv = workers(dna)
    srv.watchdog_interval, srv.watchdog_timeout = 0.2, 3.0  # a loaded CI machine must not misfire it
    async with srv:
        async with connect(srv.url) as ws:  # a stream, so that the frozen worker holds a pool row
            await ws.send(json.dumps({"type": "start", "format": "text"}))
            await ws.recv()
            frozen = next(w for w in srv.workers.values() if w.relays)
            frozen.process.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                while (again := srv.workers.get(frozen.index)) is None or again is frozen or \
                        not again.listening.done():
                    assert time.monotonic() < deadline, "the frozen worker is still in place"
                    await asyncio.sleep(0.05)
            finally:
                if frozen.process.returncode is None:
                    frozen.process.send_signal(signal.SIGCONT)
            assert frozen.process.returncode == -signal.SIGKILL and srv.scheduler.live == 0
        runs = await asyncio.gather(*(stream_dna(srv.url, bases, seed=i, open_timeout=5) for i in range(6)))
    for client, _ in runs:  # every connection opened, whichever worker the kernel chose
        assert_exact(dna, bases, client)


async def test_a_killed_workers_streams_resume_from_the_write_ahead_with_a_state_dir(dna, tmp_path):
    """With --state-dir, a stream on a worker that dies (SIGKILL) is not lost: its client
    reconnects (to any worker) and resumes from the stream's last write-ahead, as after a crash,
    instead of 4410 ``stream_lost`` and a restart from its first chunk; results stay exact."""
    bases = random_bases(60, seed=21)
    async with workers(dna, state_dir=str(tmp_path / "state"), write_ahead_interval=0.2) as srv:
        victim = StreamClient(srv.url, format="text", reconnect=20)
        await victim.__aenter__()
        await victim.send(bases[:30])
        async with asyncio.timeout(TIMEOUT):
            await victim._wait_until(lambda: not victim._pending and victim._saved_seq >= 0)
        home = next(i for i, w in srv.workers.items() if w.relays)
        srv.workers[home].process.send_signal(signal.SIGKILL)
        await victim.send(bases[30:])
        await victim.end(timeout=TIMEOUT)
        await victim.close()
    assert victim.reconnects >= 1
    assert victim.ready.get("resumed") and victim.ready["next_seq"] > 0, victim.ready  # not a restart at 0
    assert_exact(dna, bases, victim)


async def test_a_server_that_cannot_start_says_why_and_leaves_nothing_running(dna, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        srv = workers(dna, port=taken.getsockname()[1])
        with pytest.raises(OSError):  # the port is in use (serve: a ConfigError saying so)
            await srv.start()
    assert not srv.workers and srv.scheduler._task is None
    tls = dict(certfile=str(tmp_path / "missing.pem"), keyfile=str(tmp_path / "missing.key"))
    one = server(dna, **tls)
    with pytest.raises(ConfigError, match="TLS: cannot load certfile .*missing.pem"):
        await one.start()
    await one.stop()
    srv = workers(dna, **tls)
    with pytest.raises(ConfigError, match="worker .*could not start serving.*TLS: cannot load certfile .*missing.pem"):
        await srv.start()
    assert srv.scheduler._task is None
    async with asyncio.timeout(TIMEOUT):  # the workers that failed are gone
        while any(w.process.returncode is None for w in srv.workers.values()):
            await asyncio.sleep(0.05)


async def test_max_streams_holds_across_workers(dna):
    start = json.dumps({"type": "start", "format": "text"})
    async with workers(dna, max_streams=3) as srv:
        conns = [await connect(srv.url) for _ in range(6)]
        for ws in conns:
            await ws.send(start)
        got = [json.loads(await ws.recv()) for ws in conns]
        ready = [ws for ws, g in zip(conns, got) if g["type"] == "ready"]
        refused = [g for g in got if g["type"] == "error"]
        assert len(ready) == 3 and srv.scheduler.live == 3
        assert all(g["code"] == 1013 and g["reason"] == "too_many_streams" for g in refused) and len(refused) == 3
        for ws in conns:
            await ws.close()
        async with asyncio.timeout(TIMEOUT):
            while srv.scheduler.live:
                await asyncio.sleep(0.02)
        client, _ = await stream_dna(srv.url, random_bases(20, seed=3), seed=4)  # the rows came back
    assert client.results


@pytest.mark.parametrize("held", ["open", "claim"])
async def test_a_worker_that_dies_during_an_open_or_claim_leaks_neither(dna, held):
    """Defect: the engine freed a dead worker's streams and claims as soon as its link ended, while
    its calls still ran (an open waits behind the model call in progress): the stream they opened
    kept its pool row for good (max_streams one lower, /healthz live_streams never 0), the token
    they claimed answered stream_busy for good. Both are freed once the calls finish."""
    start = {"type": "start", "format": "text"}
    async with workers(dna, max_streams=4) as srv:
        if held == "claim":  # a parked stream whose resume is being claimed
            async with connect(srv.url) as ws:
                await ws.send(json.dumps(start))
                token = json.loads(await ws.recv())["resume"]
                await ws.send("ACGT")
                await ws.recv()
                ws.transport.abort()
            async with asyncio.timeout(TIMEOUT):
                while srv.scheduler.live or not len(srv.store):
                    await asyncio.sleep(0.02)
            start["resume"], start["ack"] = token, 0
        entered, release, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
        callers = []
        real = srv._ops[held]

        async def held_call(worker, *args):
            callers.append(worker)
            entered.set()
            await release.wait()  # the engine is busy with a model call meanwhile
            try:
                return await real(worker, *args)
            finally:
                answered.set()

        srv._ops[held] = held_call
        async with connect(srv.url) as ws:
            await ws.send(json.dumps(start))
            async with asyncio.timeout(TIMEOUT):
                await entered.wait()
                callers[0].process.send_signal(signal.SIGKILL)
                while not callers[0].link.closed:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)  # the engine has dealt with the dead worker's link
                release.set()
                srv._ops[held] = real
                await answered.wait()
        deadline = time.monotonic() + 5
        while srv.scheduler.live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert srv.scheduler.live == 0  # the stream opened for the dead worker freed its pool row
        health = json.loads((await http_get(srv.url.replace("ws://", "http://") + "healthz"))[2])
        assert health["live_streams"] == 0
        if held == "claim":  # the token is free again: its stream resumes
            async with connect(srv.url) as ws:
                await ws.send(json.dumps(start))
                assert json.loads(await ws.recv())["type"] == "ready"


async def test_hostile_clients_and_a_failing_stream_leave_the_canary_exact(dna):
    bases = random_bases(100, seed=31).replace("N", "A")  # the canary sends no N
    start = json.dumps({"type": "start", "format": "text"})
    async with workers(dna, max_frame_bytes=4096) as srv:
        streamer = srv.backend.streamer
        real, real_stacked = streamer.launch, streamer.launch_stacked
        poison = int(encode_bases("N")[0])

        def fault_on_poison(xs) -> None:  # the engine fails every call with an N (the attacker's) in it
            if any(bool((x == poison).any()) for x in xs):
                raise RuntimeError("device fault 42")

        def flaky(chunks, outputs=True):
            fault_on_poison(chunks.values())
            return real(chunks, outputs)

        def flaky_stacked(ids, x, outputs=True):  # the engine process's calls: its chunks stacked
            fault_on_poison([x])
            return real_stacked(ids, x, outputs)

        streamer.launch, streamer.launch_stacked = flaky, flaky_stacked

        async def attack(messages) -> tuple[dict, int, str]:
            async with connect(srv.url) as ws:
                await ws.send(start)
                token = json.loads(await ws.recv())["resume"]
                for m in messages:
                    await ws.send(m)
                got, code = await read_error(ws, TIMEOUT)
            return got, code, token

        async def attackers():
            failed = await attack(["N" * 13])
            assert failed[1] == 1011 and "device fault 42" in failed[0]["message"]
            resumes = []
            for _ in range(6):  # refused on whichever worker: the failure is known to the engine
                async with connect(srv.url) as ws:
                    await ws.send(json.dumps({"type": "start", "format": "text", "resume": failed[2]}))
                    resumes.append(await read_error(ws, TIMEOUT))
            assert all(code == 1011 and got["reason"] == "stream_failed" for got, code in resumes), resumes
            assert (await attack([b"\x00\x01"]))[1] == 1003  # binary in a text stream
            assert (await attack(["A" * 5000]))[1] == 1009  # over max_frame_bytes
            assert (await attack(['{"type": "nope"}']))[1] == 1008

        async def canary():
            async with StreamClient(srv.url, format="text") as c:
                for a in range(0, len(bases), 10):
                    await c.send(bases[a : a + 10])
                    await asyncio.sleep(0.01)
                await c.end(timeout=TIMEOUT)
            return c

        _, client = await asyncio.gather(attackers(), canary())
        async with asyncio.timeout(TIMEOUT):
            while srv.scheduler.live:
                await asyncio.sleep(0.02)
    assert_exact(dna, bases, client)


def _serve(path, *args):
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamssm.cli", "serve", "--checkpoint", str(path), "--port", "0", "--workers", "2",
         "--ping-interval", "null", *args], stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stderr:
        if "workers listening on ws://" in line:
            return proc, int(line.split("listening on ws://127.0.0.1:")[1].split("/")[0])
    proc.kill()
    raise AssertionError("server did not start")


def _across_two_servers(path, bases: str, state: str, stop_first, *first_args: str,
                        written_ahead: bool = False) -> StreamClient:
    """Stream the first 30 bases to a ``serve --workers 2`` process (state dir ``state``), stop it
    with ``stop_first(process)`` once they are answered (and, ``written_ahead``, saved), start a
    second server on the same state dir and send the rest there; returns the client."""
    loop = asyncio.new_event_loop()
    first, port = _serve(path, "--state-dir", state, *first_args)
    try:
        async def first_half():
            c = StreamClient(f"ws://127.0.0.1:{port}/", format="text", reconnect=20)
            await c.__aenter__()
            await c.send(bases[:30])
            await c._wait_until(lambda: not c._pending and (c._saved_seq >= 0 or not written_ahead))
            return c

        client = loop.run_until_complete(first_half())
        stop_first(first)
        second, port2 = _serve(path, "--state-dir", state)
        try:
            async def second_half():
                client.url = f"ws://127.0.0.1:{port2}/"
                await client.send(bases[30:])
                await client.end(timeout=TIMEOUT)
                await client.close()

            loop.run_until_complete(second_half())
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        loop.close()
        if first.poll() is None:
            first.kill()
    assert client.reconnects >= 1
    return client


def test_serve_cli_workers_sigterm_parks_streams_for_the_next_server(dna, tmp_path):
    def sigterm(first):
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0

    bases = random_bases(60, seed=21)
    assert_exact(dna, bases, _across_two_servers(dna, bases, str(tmp_path / "state"), sigterm))


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, ...); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _workers_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()
            and (stat := _stat(int(e.name))) is not None and int(stat[1]) == pid and stat[0] != "Z"]


def test_a_crashed_engine_takes_its_workers_down_and_streams_resume_from_the_write_ahead(dna, tmp_path):
    def crash(first):
        fronts = _workers_of(first.pid)
        assert len(fronts) == 2
        first.kill()  # SIGKILL: no parking, no goodbye
        first.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in fronts):
            assert time.monotonic() < deadline, "workers outlived their engine"
            time.sleep(0.05)

    bases = random_bases(60, seed=41)
    client = _across_two_servers(dna, bases, str(tmp_path / "state"), crash, "--write-ahead-interval", "0.2",
                                 written_ahead=True)
    assert_exact(dna, bases, client)


# ------------------------------------------------------------------ the worker's side of the link, alone


class _Link:
    """A link whose calls answer at once, recording what was sent."""

    def __init__(self):
        self.sent = []

    def send(self, *message):
        self.sent.append(message)

    def last_queued(self, kind):
        return self.sent[-1] if self.sent and self.sent[-1][0] == kind else None

    async def call(self, op, *args):
        self.sent.append((op, *args))
        return b"snapshot" if op == "close" else None


def engine_results(*chunks):
    """The worker's ``results(...)`` arguments for chunks computed by the engine, as its link
    delivers them: ``chunks`` = (key, seq, samples of each model call's slice)."""
    import pickle

    link = _Link()
    for key, seq, sizes in chunks:
        queue_result(link, key, seq, [(None, np.zeros(n, np.float32)) for n in sizes])
    (message,) = pickle.loads(pickle.dumps(link.sent, protocol=5))
    return message[1:]


class _Encoder:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def part(self, chunk, result):
        self.log.append((self.name, "part", chunk.seq, int(result.scores.shape[0])))
        return int(result.scores.shape[0])

    def finish(self, chunk, parts):
        return sum(parts)


async def test_a_worker_encodes_a_large_result_one_slice_per_loop_turn_and_delivers_in_order():
    from streamssm.service.remote import RemoteScheduler
    from streamssm.service.scheduler import Chunk

    log, delivered = [], []
    sched = RemoteScheduler(_Link(), queue_depth=4)
    keys = {}
    for name in ("big", "small"):
        keys[name] = await sched.open(_Encoder(log, name), lambda c, m, n=name: delivered.append((n, c.seq, m)),
                                      lambda exc: None)
    for seq in (0, 1):
        await sched.submit(keys["big"], Chunk(seq, 0, torch.zeros(6 if seq == 0 else 2, dtype=torch.long)))
    await sched.submit(keys["small"], Chunk(0, 0, torch.zeros(2, dtype=torch.long)))
    sched.results(*engine_results((keys["big"], 0, [2, 2, 2]),  # a 6-sample chunk computed in 3 model calls
                                  (keys["big"], 1, [2]),  # the next chunk of the same stream: after chunk 0
                                  (keys["small"], 0, [2])))  # another stream: not held by the big one
    assert log == [("big", "part", 0, 2), ("small", "part", 0, 2)] and delivered == [("small", 0, 2)]
    for _ in range(4):
        await asyncio.sleep(0)
    assert delivered == [("small", 0, 2), ("big", 0, 6), ("big", 1, 2)]
    assert sched.unanswered(keys["big"]) == 2  # slots stay taken until the results are sent (done())


async def test_a_worker_closes_a_stream_only_after_delivering_what_its_snapshot_covers():
    from streamssm.service.remote import RemoteScheduler
    from streamssm.service.scheduler import Chunk

    log, delivered = [], []
    sched = RemoteScheduler(_Link(), queue_depth=4)
    key = await sched.open(_Encoder(log, "s"), lambda c, m: delivered.append((c.seq, m)), lambda exc: None)
    await sched.submit(key, Chunk(0, 0, torch.zeros(6, dtype=torch.long)))
    sched.results(*engine_results((key, 0, [3, 3])))
    assert not delivered
    assert await sched.close(key, snapshot=True) == b"snapshot"
    assert delivered == [(0, 6)]  # encoded and delivered before close returned
