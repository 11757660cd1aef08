"""The service under hostile and unlucky clients (issue 17): each attack runs in a bounded loop
on loopback while a canary stream checks that its results stay exact. Ordering/fairness is
checked structurally (what the engine has or has not finished when something arrives), never by
wall-clock bounds (those are in benchmarks/bench_abuse.py)."""

import asyncio
import contextlib
import json
import math
import os
import random
import resource
import socket
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamssm.checkpoint import export_safetensors, load_for_serving
from streamssm.encoding import encode_bases
from streamssm.errors import ConfigError
from streamssm.models import ModelConfig, SSMModel
from streamssm.service.admission import FILES_BESIDE_SOCKETS, raise_open_file_limit
from streamssm.service.client import StreamClient
from streamssm.service.server import ServeConfig, StreamServer
from test_service_server import read_error

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 30.0
START = json.dumps({"type": "start", "format": "text"})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    small = dict(d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=4)
    out = {}
    for name, cfg, serving, seed in [
        ("dna", ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", **small), {"modality": "dna"}, 1),
        ("audio", ModelConfig(block="mamba", input_kind="tokens", vocab_size=256, head="lm", **small),
         {"modality": "audio", "sample_rate": 8000, "encoding": "mu_law"}, 4),
    ]:
        torch.manual_seed(seed)
        out[name] = export_safetensors(SSMModel(cfg).eval(), tmp / f"{name}.safetensors", spec=serving)
    return out


def server(path, **kw) -> StreamServer:
    kw.setdefault("port", 0)
    kw.setdefault("ping_interval", None)
    return StreamServer(load_for_serving(path), ServeConfig(**kw))


def bases(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACGTN") for _ in range(n))


def offline_dna(path, text: str):
    """Offline full forward: next-token log-probs (l, 5) and scores (l,)."""
    model = load_for_serving(path).model
    x = encode_bases(text)
    with torch.no_grad():
        logp = F.log_softmax(model(x.unsqueeze(0))[0][0].float(), -1)
    prev = torch.cat([torch.full((1, 5), -math.log(5)), logp[:-1]])
    return logp.numpy(), prev.gather(-1, x.unsqueeze(-1)).squeeze(-1).numpy()


async def canary(url, text, step=7, **kw):
    async with StreamClient(url, format="text", **kw) as c:
        for i in range(0, len(text), step):
            await c.send(text[i : i + step])
        summary = await c.end(timeout=TIMEOUT)
    return c, summary


def assert_exact(path, c, text):
    logp, scores = offline_dna(path, text)
    np.testing.assert_allclose(c.outputs(), logp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(c.scores(), scores, atol=2e-5, rtol=0)


async def until(condition, what):
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.005)


async def error_of(ws):
    """Read until the server closes; returns (its error message or None, close code)."""
    return await read_error(ws, TIMEOUT)


def big_chunk(srv):
    """The chunk the engine is slicing right now (None when there is none)."""
    for s in srv.scheduler._streams.values():
        if s.pending and 0 < s.pending[0].taken:
            return s.pending[0]
    return None


# ----------------------------------------------------------------------------- 1. slot leak


async def test_clients_that_abort_around_ready_or_mid_frame_leak_no_slot(ckpts):
    text = bases(90, 1)
    async with server(ckpts["dna"], max_streams=3, slice_samples=16) as srv:
        busy = await connect(srv.url)  # keeps the engine busy so opens wait behind compute
        await busy.send(json.dumps({"type": "start", "format": "text", "include": ["scores"]}))
        await busy.recv()
        for i in range(24):
            # never true if slots leak; and the aborted clients' handlers are done (an open may still
            # be queued behind the busy engine: the row it takes is in use until its handler ends)
            await until(lambda: srv.scheduler.live <= 2 and len(srv._server.handler_tasks) <= 1, "a slot")
            ws = await connect(srv.url)
            await ws.send(START)
            if i % 3 == 1:  # got ready, dropped with a frame in flight
                await ws.recv()
                await ws.send("ACGT" * 50)
            elif i % 3 == 2:  # dropped in the middle of a frame's bytes
                await ws.recv()
                ws.transport.write(b"\x81\x7e\x10\x00ACGT")  # a 4096-byte text frame header + 4 bytes
            if i % 4 == 0:
                await busy.send("ACGT" * 100)
            ws.transport.abort()
        await busy.close()
        await until(lambda: srv.scheduler.live == 0 and srv.streamer.live == 0, "slots freed")
        c, _ = await canary(srv.url, text)
        assert srv.scheduler.live == 0 and srv.streamer.live == 0
    assert_exact(ckpts["dna"], c, text)


async def test_a_flood_of_idle_connections_cannot_lock_out_a_stream(ckpts):
    """Sockets that never start a stream (raw TCP, or a websocket that sends nothing) beside a
    canary, under a small open-file limit: before the pending cap they took every descriptor and
    the canary's connection was never accepted; now the oldest pending ones are dropped."""
    text = bases(60, seed=11)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with server(ckpts["dna"], max_pending=8, max_streams=4) as srv:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 200, hard))
        raw, idle = [], []
        try:
            for _ in range(150):  # 150 client sockets here + 150 server sides > the 200 left
                raw.append(await asyncio.open_connection("127.0.0.1", srv.port))
            for _ in range(5):  # handshake done, no start
                idle.append(await connect(srv.url))
            c, _ = await asyncio.wait_for(canary(srv.url, text), TIMEOUT)
            assert_exact(ckpts["dna"], c, text)
            assert len(srv.pending) <= 8
            dropped = 0
            for reader, _ in raw:
                dropped += await asyncio.wait_for(reader.read(1), TIMEOUT) == b""
            assert dropped >= 150 - 8
            metrics = srv.metrics.render().decode()
            assert 'streamssm_rejected_total{reason="pending_limit"}' in metrics
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for _, writer in raw:
                writer.close()
            for ws in idle:
                await ws.close()


def test_the_open_file_limit_is_raised_for_the_sockets_a_server_may_hold():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 10
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        got = raise_open_file_limit(1000)
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(1000 + FILES_BESIDE_SOCKETS, hard)
        assert raise_open_file_limit(10) == got  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_open_cancelled_while_the_worker_opens_the_row_frees_it(ckpts):
    from streamssm.service.scheduler import Scheduler

    streamer = load_for_serving(ckpts["dna"]).model
    from streamssm.inference import Streamer

    sched = Scheduler(Streamer(streamer, 2))
    await sched.start()
    try:
        sched._executor.submit(lambda: __import__("time").sleep(0.2))  # the worker is busy
        task = asyncio.create_task(sched.open(None, None, None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sched._call(lambda: None)  # after the open and its clean-up
        await sched._call(lambda: None)
    finally:
        await sched.stop()
    assert sched.streamer.live == 0 and sched.live == 0


# ----------------------------------------------------------------------------- 2. one client stalls all


async def test_a_large_frame_is_sliced_and_interleaved_with_other_streams(ckpts):
    text = bases(60, 2)
    async with server(ckpts["dna"], slice_samples=16, max_frame_bytes=1 << 16) as srv:
        attacker = await connect(srv.url, max_size=None)
        await attacker.send(json.dumps({"type": "start", "format": "text", "include": ["scores"]}))
        await attacker.recv()
        big = bases(4000, 3)
        await attacker.send(big)
        await until(lambda: big_chunk(srv) is not None, "big frame started")
        chunk = big_chunk(srv)
        # a new client gets ready, and a canary gets all its results, while the big frame is still being computed
        newcomer = await connect(srv.url)
        await newcomer.send(START)
        assert json.loads(await newcomer.recv())["type"] == "ready"
        assert chunk.taken < chunk.n
        c, _ = await canary(srv.url, text)
        assert chunk.taken < chunk.n, "the canary waited for the whole big frame"
        await newcomer.close()
        result = json.loads(await asyncio.wait_for(attacker.recv(), TIMEOUT))
        await attacker.close()
    assert_exact(ckpts["dna"], c, text)
    _, scores = offline_dna(ckpts["dna"], big)
    np.testing.assert_allclose(result["scores"], scores, atol=2e-5)


@pytest.mark.parametrize("parked", [False, True])
async def test_a_gone_clients_started_frame_is_finished_only_when_its_stream_is_parked(ckpts, parked):
    async with server(ckpts["dna"], slice_samples=16, max_frame_bytes=1 << 16, resume_ttl=300 if parked else 0) as srv:
        ws = await connect(srv.url, max_size=None)
        await ws.send(json.dumps({"type": "start", "format": "text", "include": ["scores"]}))
        await ws.recv()
        await ws.send("ACGT")  # one result: a stream worth parking
        await ws.recv()
        await ws.send(bases(4000, 5))
        await until(lambda: big_chunk(srv) is not None, "big frame started")
        chunk = big_chunk(srv)
        ws.transport.abort()
        await until(lambda: srv.scheduler.live == 0, "closed")
        done_when_closed = chunk.taken
        await until(lambda: len(srv.store) == int(parked), "parked")
    # parked: its snapshot lies on a chunk boundary (the frame computed to its end); not: abandoned
    assert (done_when_closed == chunk.n) == parked, (done_when_closed, chunk.n)


async def test_idle_timeout_does_not_count_the_servers_backlog_and_end_waits(ckpts):
    big = bases(6000, 4)
    async with server(ckpts["dna"], slice_samples=8, idle_timeout=0.3, max_frame_bytes=1 << 16) as srv:
        async with connect(srv.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "format": "text", "include": ["scores"]}))
            await ws.recv()
            await ws.send(big)
            await ws.send(big[:100])
            await ws.send(json.dumps({"type": "end"}))
            replies = [json.loads(m) async for m in ws]
        assert srv.scheduler.batches > 100  # the backlog lasted many model calls (many idle timeouts)
    assert [r["type"] for r in replies] == ["result", "result", "summary"]
    assert replies[-1]["samples"] == 6100


def slow_reader(srv):
    """A client connection whose kernel receive buffer holds 4 kB: reading nothing, it soon
    makes the server's sends wait."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port))
    return connect(srv.url, sock=sock, max_queue=1, max_size=None)


async def timed_out(srv, ws) -> dict:
    """Wait for the server's idle_timeout close of ``ws``; returns its error message (code 1008)."""
    await until(lambda: 'reason="idle_timeout"} 1.0' in srv.metrics.render().decode(), "the timeout")
    got, code = await error_of(ws)
    assert code == 1008 and got["reason"] == "idle_timeout"
    return got


@pytest.mark.parametrize("queue_depth", [8, 2], ids=["waiting-for-a-frame", "waiting-for-a-queue-slot"])
async def test_a_client_that_stops_reading_its_results_is_timed_out(ckpts, queue_depth):
    """The server owes this client results, so its silence is no idleness; but a result that
    has waited idle_timeout to be sent (the client reads nothing) ends the stream with 1008,
    whether the handler waits for the client's next frame or (regression) for a queue slot:
    past queue_depth unanswered chunks it waits in submit() for a slot only a sent result frees,
    and the idle watchdog watched receive() alone, so a client that kept sending and never read
    held its stream and pool row until a keepalive ping, or forever without pings."""
    async with server(ckpts["dna"], idle_timeout=0.5, queue_depth=queue_depth) as srv:
        async with slow_reader(srv) as ws:
            await ws.send(START)
            await ws.recv()
            (session,) = srv._live.values()  # small kernel buffers: the server's send soon waits
            session.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for seed in range(6):  # ~100 kB of JSON results each
                await ws.send(bases(2000, seed))
            got = await timed_out(srv, ws)
    assert "has not read its results" in got["message"]


SAMPLE_HELD_BY_THE_RESAMPLER = ("audio", {"type": "start", "format": "s16le", "sample_rate": 44100}, b"\x01\x00")


@pytest.mark.parametrize("ckpt, start, message", [
    ("dna", json.loads(START), json.dumps({"type": "ping", "id": int("9" * 4000)})),
    SAMPLE_HELD_BY_THE_RESAMPLER,
], ids=["pings", "frames-the-resampler-holds"])
async def test_messages_answered_by_the_session_wait_for_a_client_that_reads_nothing(ckpts, ckpt, start, message):
    """Regression: pongs and the empty results of frames a resampler holds whole (no model call,
    so no queue slot) went into an unbounded outbox while the client read nothing: pings with
    4,000-digit ids grew the server by its upload rate (~110 MB in 8 s on loopback) until
    idle_timeout. Now they wait while the outbox holds queue_depth messages (the socket stops
    being read), and the stream times out as one that reads nothing; its close is bounded too
    (regression: with no keepalive pings the close handshake waited forever for a socket that
    never drained, holding the stream's pool row)."""
    text = bases(60, seed=5)
    async with server(ckpts[ckpt], idle_timeout=1.0, queue_depth=4) as srv:
        async with slow_reader(srv) as ws:
            await ws.send(json.dumps(start))
            await ws.recv()
            (session,) = srv._live.values()
            session.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            most = 0

            async def flood():
                for _ in range(3000):  # the sends block once the server stops reading
                    await ws.send(message)

            attack = asyncio.create_task(flood())
            try:
                async with asyncio.timeout(TIMEOUT):
                    while srv._live.get(session.token) is session:
                        most = max(most, session.outbox.qsize())
                        await asyncio.sleep(0.001)
                assert 'streamssm_rejected_total{reason="idle_timeout"} 1.0' in srv.metrics.render().decode()
                await until(lambda: srv.scheduler.live == 0, "the attacker's row freed")
                if ckpt == "dna":
                    c, _ = await canary(srv.url, text)
                    assert_exact(ckpts["dna"], c, text)
            finally:
                attack.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await attack
    assert most <= 4 + 1, f"{most} messages queued for a client that reads nothing"


async def test_a_resumed_client_that_reads_none_of_its_replay_is_timed_out(ckpts):
    """A client that resumes and reads none of its replay (more than the kernel buffers hold)
    does not hold the connection: the greeting is bounded by idle_timeout (it had no test)."""
    async with server(ckpts["dna"], idle_timeout=0.5) as srv:
        async with connect(srv.url, max_size=None) as ws:
            await ws.send(START)
            token = json.loads(await ws.recv())["resume"]
            for seed in range(60):  # ~100 kB of JSON results each, all read, none acknowledged
                await ws.send(bases(2000, seed))
                await ws.recv()
            ws.transport.abort()  # parked: the 60 results wait in its replay buffer
        await until(lambda: len(srv.store) == 1, "the park")
        async with slow_reader(srv) as ws:
            await ws.send(json.dumps({"type": "start", "format": "text", "resume": token, "ack": -1}))
            got = await timed_out(srv, ws)
    assert "did not read ready" in got["message"]


async def test_engine_errors_reach_the_client_with_their_reason_also_on_resume(ckpts):
    async with server(ckpts["dna"]) as srv:
        real = srv.streamer.launch

        def flaky(chunks, outputs=True):
            if any(len(x) == 13 for x in chunks.values()):
                raise RuntimeError("device fault 42")
            return real(chunks, outputs)

        srv.streamer.launch = flaky
        ws = await connect(srv.url)
        await ws.send(START)
        token = json.loads(await ws.recv())["resume"]
        await ws.send("A" * 13)
        got, code = await error_of(ws)
        assert code == 1011 and "device fault 42" in got["message"]
        ws = await connect(srv.url)
        await ws.send(json.dumps({"type": "start", "format": "text", "resume": token}))
        got, code = await error_of(ws)
    assert code == 1011 and got["reason"] == "stream_failed" and "device fault 42" in got["message"]


# ----------------------------------------------------------------------------- 3. output amplification


async def test_result_size_limit_refuses_amplifying_frames_and_scores_only_passes(ckpts):
    pcm = (np.sin(np.arange(2000) / 5) * 9000).astype("<i2").tobytes()
    start = {"type": "start", "format": "s16le", "sample_rate": 8000}
    async with server(ckpts["audio"], max_result_bytes=1 << 20) as srv:  # 2000 x 257 x 16 B > 1 MiB
        async with connect(srv.url) as ws:
            await ws.send(json.dumps(start))
            await ws.recv()
            await ws.send(pcm)
            got, code = await error_of(ws)
        assert code == 1009 and got["reason"] == "result_too_big" and "scores" in got["message"]
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({**start, "include": ["scores"]}))
            await ws.recv()
            await ws.send(pcm)
            result = json.loads(await ws.recv())
    assert result["n"] == 2000 and len(result["scores"]) == 2000 and "outputs" not in result


# ----------------------------------------------------------------------------- 4. crash safety


async def test_write_ahead_survives_a_crash_and_a_resumed_file_is_kept(ckpts, tmp_path):
    text = bases(80, 5)
    state = tmp_path / "state"
    first = server(ckpts["dna"], state_dir=str(state), write_ahead_interval=3600)
    await first.start()
    try:
        c = StreamClient(first.url, format="text", reconnect=0)
        await c.__aenter__()
        for i in range(0, 40, 8):
            await c.send(text[i : i + 8])
        await c._wait_until(lambda: not c._pending)
        await first.write_ahead()
        files = list(state.glob("*.safetensors"))
        assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
        assert stat.S_IMODE((state / "resume.key").stat().st_mode) == 0o600
        # "crash": the first server never parks; a second one on the same state dir resumes from the write-ahead
        async with server(ckpts["dna"], state_dir=str(state)) as second:
            ws = await connect(second.url)
            await ws.send(json.dumps({"type": "start", "format": "text", "resume": c.resume_token, "ack": 4}))
            ready = json.loads(await ws.recv())
            assert ready["resumed"] and ready["next_seq"] == 5 and ready["samples"] == 40
            assert files[0].exists()  # live again, not yet re-written: a second crash must not lose it
            for i in range(40, 80, 8):
                await ws.send(text[i : i + 8])
            await ws.send(json.dumps({"type": "end"}))
            replies = [json.loads(m) async for m in ws]
        assert not files[0].exists()  # ended: gone
    finally:
        c._ws.transport.abort()
        await first.stop()
    results = c.results + [r for r in replies if r["type"] == "result"]
    logp, scores = offline_dna(ckpts["dna"], text)
    got = np.concatenate([np.asarray(r.scores if hasattr(r, "scores") else r["scores"]) for r in results])
    np.testing.assert_allclose(got, scores, atol=2e-5)
    assert replies[-1]["samples"] == 80


async def test_lost_stream_is_told_apart_from_an_invalid_token(ckpts, tmp_path):
    async with server(ckpts["dna"], state_dir=str(tmp_path)) as srv:
        ws = await connect(srv.url)
        await ws.send(START)
        token = json.loads(await ws.recv())["resume"]
        ws.transport.abort()  # no result yet: nothing to park
        # the handler over, its token released (the pool row is freed first: a resume in between is stream_busy)
        await until(lambda: srv.scheduler.live == 0 and not srv._live, "closed")
        codes = []
        for t in (token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")):
            ws = await connect(srv.url)
            await ws.send(json.dumps({"type": "start", "format": "text", "resume": t}))
            got, code = await error_of(ws)
            codes.append((code, got["reason"]))
    assert codes == [(4410, "stream_lost"), (1008, "bad_resume")]
    # the forged token's message does not call it expired (an expired token of ours is stream_lost)
    assert "expired" not in got["message"] and "not issued by this server" in got["message"]


# ----------------------------------------------------------------------------- 5. parked streams


async def test_parked_streams_are_capped_and_protocol_errors_are_not_parked(ckpts, tmp_path):
    async with server(ckpts["dna"], state_dir=str(tmp_path), max_parked=3) as srv:
        for i in range(7):
            ws = await connect(srv.url)
            await ws.send(START)
            await ws.recv()
            await ws.send("ACGT")
            await ws.recv()
            if i == 6:
                await ws.send("ACGU")  # a protocol error: that stream is not parked
                await error_of(ws)
            else:
                ws.transport.abort()
            # parking runs in a thread after the pool row is freed: wait for it too (a slow disk)
            await until(lambda: srv.scheduler.live == 0 and (i == 6 or len(srv.store) == min(i + 1, 3)), "parked")
        assert len(srv.store) == 3
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


# ----------------------------------------------------------------------------- 7. the rest


async def test_sent_beyond_queue_depth_survives_a_restart(ckpts, tmp_path):
    text = bases(40 * 3, 6)
    async with server(ckpts["dna"], state_dir=str(tmp_path), queue_depth=2) as srv:
        ws = await connect(srv.url, max_queue=2)
        await ws.send(START)
        token = json.loads(await ws.recv())["resume"]
        for i in range(40):  # never reads: results pile up in buffers
            await ws.send(text[3 * i : 3 * i + 3])
        await until(lambda: srv.scheduler.unanswered(next(iter(srv.scheduler._streams))) == 0
                    and srv._live[token].done_seq == 40, "all computed")
        await srv.stop()  # SIGTERM: 1012, parked
        got = []
        with pytest.raises(ConnectionClosed):
            while True:
                got.append(json.loads(await ws.recv()))
    async with server(ckpts["dna"], state_dir=str(tmp_path), queue_depth=2) as srv:
        ack = got[-1]["seq"] if got else -1
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "start", "format": "text", "resume": token, "ack": ack}))
            assert json.loads(await ws.recv())["next_seq"] == 40
            while len(got) < 40:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))
    assert [r["seq"] for r in got] == list(range(40))
    _, scores = offline_dna(ckpts["dna"], text)
    np.testing.assert_allclose(np.concatenate([r["scores"] for r in got]), scores, atol=2e-5)


async def test_concurrent_resumes_and_changed_encoding(ckpts):
    async with server(ckpts["dna"]) as srv:
        ws = await connect(srv.url)
        await ws.send(START)
        token = json.loads(await ws.recv())["resume"]
        await ws.send("ACGT")
        await ws.recv()
        ws.transport.abort()
        await until(lambda: len(srv.store) == 1, "parked")
        resume = json.dumps({"type": "start", "format": "text", "resume": token, "ack": 0})
        conns = [await connect(srv.url) for _ in range(4)]
        await asyncio.gather(*(c.send(resume) for c in conns))
        replies = [json.loads(await c.recv()) for c in conns]
        kinds = sorted((r["type"], r.get("code")) for r in replies)
        assert kinds == [("error", 1013)] * 3 + [("ready", None)], kinds
        for c in conns:
            await c.close()
        await until(lambda: len(srv.store) == 1 and not srv._live, "parked again")
        ws = await connect(srv.url)
        await ws.send(json.dumps({"type": "start", "format": "text", "resume": token, "results": "binary"}))
        got, code = await error_of(ws)
    assert code == 1008 and got["reason"] == "resume_mismatch" and "results" in got["message"]


async def test_hostile_headers_and_numbers(ckpts):
    async with server(ckpts["dna"], token="s3cret") as srv:
        with pytest.raises(InvalidStatus) as err:
            async with connect(srv.url, additional_headers=[("Authorization", "Bearer s3cret"),
                                                            ("Authorization", "Bearer s3cret")]):
                pass
        assert err.value.response.status_code == 400
        auth = {"Authorization": "Bearer s3cret"}
        for start, code in [('{"type": "start", "format": "text", "ack": ' + "9" * 5000 + "}", 1007),
                            (json.dumps({"type": "start", "format": "text", "version": 1.0}), 1008),
                            (json.dumps({"type": "start", "format": "text", "version": True}), 1008),
                            (json.dumps({"type": "start", "format": "text", "channels": 2**31}), 1008)]:
            async with connect(srv.url, additional_headers=auth) as ws:
                await ws.send(start)
                got, got_code = await error_of(ws)
            assert got_code == code and got["code"] == code, (start[:60], got)


def test_empty_token_is_refused_and_public_host_without_token_warns(ckpts, caplog):
    with pytest.raises(ConfigError, match="token is empty"):
        ServeConfig(token="")

    async def run():
        async with server(ckpts["dna"], host="0.0.0.0"):
            pass

    with caplog.at_level("WARNING", logger="streamssm.service.server"):
        asyncio.run(run())
    assert any("without --token" in r.getMessage() for r in caplog.records)


async def test_ack_trims_the_replay_buffer_and_a_too_old_ack_is_refused_not_skipped(ckpts):
    async with server(ckpts["dna"], replay_bytes=1) as srv:  # keeps only the newest result
        ws = await connect(srv.url)
        await ws.send(START)
        token = json.loads(await ws.recv())["resume"]
        for i in range(3):
            await ws.send("ACGT")
            await ws.recv()
        ws.transport.abort()
        await until(lambda: len(srv.store) == 1, "parked")
        replies = []
        for ack in (0, 1):  # results 1 is gone (over replay_bytes): refused; from 2 on: replayed
            async with connect(srv.url) as ws:
                await ws.send(json.dumps({"type": "start", "format": "text", "resume": token, "ack": ack}))
                replies.append(json.loads(await ws.recv()))
                if replies[-1]["type"] == "ready":
                    replies.append(json.loads(await ws.recv()))
                    await ws.send(json.dumps({"type": "ack", "seq": 2}))
                    await ws.send("ACGT")
                    replies.append(json.loads(await ws.recv()))
            await until(lambda: len(srv.store) == 1 and not srv._live, "parked again")
        assert [seq for seq, _ in srv.store._parked[token].replay] == [3]  # acked 2 is gone
    assert replies[0]["reason"] == "results_lost" and "1..1" in replies[0]["message"]
    assert [r.get("seq") for r in replies[1:]] == [None, 2, 3]


async def test_streams_with_many_result_values_get_smaller_slices(ckpts):
    from streamssm.service.protocol import Start

    async with server(ckpts["audio"], slice_samples=1024) as srv:
        json_out, scores = Start("s16le", 8000, 1), Start("s16le", 8000, 1, include=("scores",))
        binary = Start("s16le", 8000, 1, results="binary")
        assert (srv._slice_samples(json_out), srv._slice_samples(scores), srv._slice_samples(binary)) == (63, 1024, 63)


# ----------------------------------------------------------------------------- 8. found by an attacker (2026-12-07)


@pytest.mark.parametrize("start, code, reason", [
    ({"type": "start", "format": "A" * 3000}, 1003, "bad_format"),  # a long field under the control limit
    ({"type": "start", "format": "text", "include": list(range(500))}, 1008, "bad_start"),
    ({"type": "start", "format": "A" * 1_000_000}, 1009, "control_too_big"),  # not even parsed
    ({"type": "start", "format": "text", "pad": [[]] * 100_000}, 1009, "control_too_big"),
])
async def test_a_huge_start_field_is_not_echoed_into_the_error(ckpts, caplog, start, code, reason):
    """Regression: a megabyte-long start field came back whole in the error message (and the server's
    log line), and a megabyte of JSON was parsed on the event loop."""
    async with server(ckpts["dna"]) as srv:
        ws = await connect(srv.url, max_size=None)
        await ws.send(json.dumps(start))
        error, closed = await error_of(ws)
    assert closed == code and error["reason"] == reason
    assert len(error["message"]) < 300, error["message"][:400]
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


async def test_a_large_control_message_mid_stream_is_refused(ckpts):
    """Acks padded to a megabyte, back to back, each parsed on the event loop, held up every stream."""
    async with server(ckpts["dna"]) as srv:
        ws = await connect(srv.url, max_size=None)
        await ws.send(START)
        await ws.recv()
        await ws.send(json.dumps({"type": "ack", "seq": 0, "pad": "x" * 10_000}))
        error, closed = await error_of(ws)
        assert closed == 1009 and error["reason"] == "control_too_big" and "limit of 8192" in error["message"]
        text = bases(300, 11)
        c, _ = await canary(srv.url, text)  # the server carries on
    assert_exact(ckpts["dna"], c, text)


@pytest.mark.parametrize("message, named", [
    ({"type": "ack", "seq": -2}, "seq must be -1 or a result's seq, got -2"),
    ({"type": "ack", "seq": 1, "pad": 0}, "unexpected control message"),
    ({"type": "end", "reason": "done"}, "unexpected control message"),
])
async def test_a_negative_ack_or_a_control_message_with_extra_fields_is_refused(ckpts, message, named):
    """Regression: an ack of seq -2 and ``end``/``ack`` with extra fields (a client's typo, or a field
    it expects the server to act on) were taken silently; ``reset`` and ``ping`` already refused them."""
    async with server(ckpts["dna"]) as srv:
        ws = await connect(srv.url)
        await ws.send(START)
        await ws.recv()
        for _ in range(2):
            await ws.send("ACGT")
            await ws.recv()
        await ws.send(json.dumps(message))
        error, closed = await error_of(ws)
        assert closed == 1008 and error["reason"] == "bad_message" and named in error["message"], error
        text = bases(60, 13)
        c, _ = await canary(srv.url, text)
    assert_exact(ckpts["dna"], c, text)


async def test_a_control_flood_leaves_a_canary_exact(ckpts):
    """A client sending acks and pings as fast as the socket takes them (no flow control applies to
    them) beside a canary: the canary's results stay exact and the flooder's stream still ends cleanly."""
    async with server(ckpts["dna"]) as srv:
        flooder = await connect(srv.url, max_size=None)
        await flooder.send(START)
        await flooder.recv()

        async def flood() -> None:
            for i in range(3000):
                await flooder.send('{"type":"ack","seq":-1}' if i % 2 else '{"type":"ping"}')
            await flooder.send('{"type":"end"}')

        async def drain() -> dict:
            last = None
            async for reply in flooder:
                last = json.loads(reply)
            return last

        text = bases(400, 12)
        _, summary, (c, _) = await asyncio.gather(flood(), drain(), canary(srv.url, text))
    assert summary["type"] == "summary" and summary["chunks"] == 0
    assert_exact(ckpts["dna"], c, text)


@pytest.mark.parametrize("attack", ["invalid_utf8", "oversized_frame"])
async def test_a_websocket_layer_protocol_error_is_not_parked(ckpts, tmp_path, attack):
    """Regression: errors the websocket layer catches itself (1007 invalid UTF-8, 1009 a frame over
    twice --max-frame-bytes) left the stream parked and resumable, unlike the same errors caught by the
    server's checks (PROTOCOL.md: streams closed for a protocol error are not kept)."""
    async with server(ckpts["dna"], state_dir=str(tmp_path), max_frame_bytes=1024) as srv:
        ws = await connect(srv.url, max_size=None)
        await ws.send(START)
        await ws.recv()
        await ws.send("ACGT")
        await ws.recv()
        if attack == "invalid_utf8":
            await ws.send(b"AC\xffGT", text=True)  # a text frame that is not UTF-8
        else:
            await ws.send("A" * 4096)
        _, closed = await error_of(ws)
        assert closed == (1007 if attack == "invalid_utf8" else 1009)
        await until(lambda: srv.scheduler.live == 0, "the stream closed")
        await asyncio.sleep(0.2)  # parking would run in a thread after the row is freed
        assert len(srv.store) == 0
        # a client's own abort is still parked
        ws = await connect(srv.url)
        await ws.send(START)
        await ws.recv()
        await ws.send("ACGT")
        await ws.recv()
        ws.transport.abort()
        await until(lambda: len(srv.store) == 1, "parked")


async def test_control_messages_past_the_rate_pause_the_socket(ckpts, monkeypatch):
    """Past CONTROL_RATE control messages a second the server stops reading the stream's socket for
    a while (a lower bound on the flood's time, which sleeping guarantees: no wall-clock upper bound)."""
    from streamssm.service import session

    monkeypatch.setattr(session, "CONTROL_RATE", 100)
    async with server(ckpts["dna"]) as srv:
        ws = await connect(srv.url)
        await ws.send(START)
        await ws.recv()
        t0 = asyncio.get_running_loop().time()
        for i in range(300):
            await ws.send(json.dumps({"type": "ping", "id": i}))
        for i in range(300):
            assert json.loads(await ws.recv()) == {"type": "pong", "id": i}
        elapsed = asyncio.get_running_loop().time() - t0
        await ws.send('{"type":"end"}')
        assert json.loads(await ws.recv())["type"] == "summary"
    assert elapsed >= 1.5  # 300 messages, a burst of 100, then 100 a second: 2 s


async def test_a_client_that_fills_its_queue_and_leaves_frees_its_row_without_the_queued_chunks(ckpts):
    """Regression: with every queue slot taken the handler waited for a slot, not on the socket, so a
    client that queued large frames and dropped the connection kept its pool row (and the engine)
    until every queued chunk was computed; chunks received but not started are to be dropped."""
    async with server(ckpts["dna"], slice_samples=16, max_frame_bytes=1 << 16, queue_depth=2, resume_ttl=0) as srv:
        ws = await connect(srv.url, max_size=None)
        await ws.send(json.dumps({"type": "start", "format": "text", "include": ["scores"]}))
        await ws.recv()
        for k in range(4):  # 2 queued, the 3rd waits for a slot in the handler, the 4th in the socket
            await ws.send(bases(4000, 20 + k))
        await until(lambda: big_chunk(srv) is not None, "the first frame started")
        first = big_chunk(srv)
        ws.transport.abort()
        await until(lambda: srv.scheduler.live == 0, "the stream closed")
        assert first.taken < first.n, "the stream stayed open until its queued frames were computed"
        text = bases(200, 13)
        c, _ = await canary(srv.url, text)
    assert_exact(ckpts["dna"], c, text)
