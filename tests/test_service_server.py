"""The websocket service end to end: a real server on a free loopback port, real websockets clients.

Streamed outputs must equal each stream's offline full forward; bad clients get the right
error and close code while good streams go on; resume after a disconnect and after a server
restart (state dir) gives the uninterrupted outputs; auth, health and metrics.
"""

import asyncio
import gc
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamssm.checkpoint import export_safetensors, load_for_serving
from streamssm.encoding import Normalizer, encode_bases, mu_law_encode
from streamssm.errors import ConfigError
from streamssm.models import ModelConfig, SSMModel
from streamssm.service.client import StreamClient
from streamssm.service.sources import read_source, stream_source
from streamssm.service.multiprocess import MultiProcessServer
from streamssm.service.server import ServeConfig, StreamServer

pytestmark = pytest.mark.timeout(60)

SENSOR_META = {"modality": "sensor", "channels": ["a", "b", "c"], "mean": [1.0, -2.0, 0.5], "std": [2.0, 0.5, 3.0]}
TIMEOUT = 20.0


def _export(tmp, name, cfg, serving, seed):
    torch.manual_seed(seed)
    model = SSMModel(cfg).eval()
    return export_safetensors(model, tmp / f"{name}.safetensors", spec=serving)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    small = dict(d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=4)
    return {
        "dna": _export(tmp, "dna", ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", **small),
                       {"modality": "dna"}, 1),
        "dna_other": _export(tmp, "dna2", ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", **small),
                             {"modality": "dna"}, 2),
        "audio": _export(tmp, "audio", ModelConfig(block="mamba", input_kind="tokens", vocab_size=256, head="lm", **small),
                         {"modality": "audio", "sample_rate": 8000, "encoding": "mu_law"}, 4),
        "sensor": _export(tmp, "sensor", ModelConfig(block="mamba", input_kind="continuous", input_dim=3,
                                                     head="regression", output_dim=3, **small), SENSOR_META, 3),
    }


def offline_dna(path, bases: str):
    """Offline full forward of a DNA LM: log-probs of the next token (l, 5) and scores (l,)."""
    model = load_for_serving(path).model
    x = encode_bases(bases)
    with torch.no_grad():
        y, _ = model(x.unsqueeze(0))
    logp = F.log_softmax(y[0].float(), -1)
    prev = torch.cat([torch.full((1, 5), -math.log(5)), logp[:-1]])
    return logp.numpy(), prev.gather(-1, x.unsqueeze(-1)).squeeze(-1).numpy()


def offline_sensor(path, values: np.ndarray) -> np.ndarray:
    """Forecasts in raw units: invert(model(normalize(values)))."""
    model = load_for_serving(path).model
    norm = Normalizer(SENSOR_META["mean"], SENSOR_META["std"])
    with torch.no_grad():
        y, _ = model(norm.apply(torch.from_numpy(values)).unsqueeze(0))
    return norm.invert(y[0]).numpy()


def random_bases(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACGTN") for _ in range(n))


def random_cuts(n: int, seed: int, sizes=(1, 2, 3, 5, 8, 13)) -> list[tuple[int, int]]:
    rng, out, pos = random.Random(seed), [], 0
    while pos < n:
        k = rng.choice(sizes)
        out.append((pos, min(n, pos + k)))
        pos += k
    return out


def server(path, **kw) -> StreamServer | MultiProcessServer:
    """A server on a free port (``workers=N``: N worker processes and the engine here)."""
    kw.setdefault("port", 0)
    kw.setdefault("ping_interval", None)
    cfg = ServeConfig(**kw)
    return StreamServer(load_for_serving(path), cfg) if cfg.workers == 1 else MultiProcessServer(load_for_serving(path), cfg)


async def stream_dna(url, bases, seed, **kw):
    async with StreamClient(url, format="text", **kw) as c:
        for a, b in random_cuts(len(bases), seed):
            await c.send(bases[a:b])
        summary = await c.end(timeout=TIMEOUT)
    return c, summary


async def read_error(ws, timeout: float = TIMEOUT):
    """Read until the server closes; returns (its error message or None, close code)."""
    got = None
    try:
        async with asyncio.timeout(timeout):
            async for reply in ws:
                if isinstance(reply, str) and json.loads(reply).get("type") == "error":
                    got = json.loads(reply)
    except ConnectionClosed:
        pass
    await ws.wait_closed()
    return got, ws.close_code


async def expect_error(url, messages, code, headers=None):
    """Send ``messages`` on a fresh connection; expect an error message and close ``code``."""
    async with connect(url, additional_headers=headers, open_timeout=TIMEOUT) as ws:
        try:
            for m in messages:
                await ws.send(m)
        except ConnectionClosed:
            pass
        got, _ = await read_error(ws)
    assert ws.close_code == code, (ws.close_code, ws.close_reason, got)
    assert got is not None and got["code"] == code and got["message"], got
    return got


def _http_get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


async def http_get(url, headers=None):
    """GET in a thread: the server shares this test's event loop."""
    return await asyncio.to_thread(_http_get, url, headers)


# ---------------------------------------------------------------------------------------- tests


async def test_concurrent_streams_equal_offline_forward(ckpts):
    n_clients = 6
    async with server(ckpts["dna"], max_streams=8) as srv:
        seqs = [random_bases(40 + 7 * i, seed=i) for i in range(n_clients)]
        runs = await asyncio.gather(*(stream_dna(srv.url, s, seed=100 + i) for i, s in enumerate(seqs)))
        batches, chunks = srv.scheduler.batches, sum(len(c.results) for c, _ in runs)
    for bases, (client, summary) in zip(seqs, runs):
        logp, scores = offline_dna(ckpts["dna"], bases)
        np.testing.assert_allclose(client.outputs(), logp, atol=2e-5, rtol=0)
        np.testing.assert_allclose(client.scores(), scores, atol=2e-5, rtol=0)
        assert [r.seq for r in client.results] == list(range(len(client.results)))
        assert summary["samples"] == len(bases) and summary["chunks"] == len(client.results)
        assert summary["log_likelihood"] == pytest.approx(float(scores.astype(np.float64).sum()), abs=1e-3)
    assert batches < chunks  # chunks of several streams shared model calls


@pytest.mark.parametrize("rate", [None, 100])
async def test_sensor_regression_binary_results_in_raw_units(ckpts, rate):
    """``rate``: the client says its rows come at 100 Hz (``streamssm stream sensors.csv
    --sample-rate 100``, the stream command's own example) to a model trained without a rate:
    taken as information (regression, CLI audit: an AssertionError in the codec, 1011)."""
    values = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32) * 2 + 1
    async with server(ckpts["sensor"]) as srv:
        async with StreamClient(srv.url, format="f32le", channels=3, results="binary", sample_rate=rate) as c:
            for a, b in random_cuts(len(values), 5):
                await c.send(values[a:b])
            summary = await c.end(timeout=TIMEOUT)
    expected = offline_sensor(ckpts["sensor"], values)
    np.testing.assert_allclose(c.outputs(), expected, rtol=1e-4, atol=1e-4)
    assert c.scores() is None
    np.testing.assert_allclose(summary["forecast"], expected[-1], rtol=1e-4, atol=1e-4)


async def test_audio_s16le_mu_law_scores_only(ckpts):
    rng = np.random.default_rng(1)
    pcm = (np.sin(np.arange(60) / 3.0) * 20000 + rng.normal(size=60) * 500).astype(np.int16)
    async with server(ckpts["audio"]) as srv:
        await expect_error(srv.url, [json.dumps({"type": "start", "format": "s16le", "sample_rate": 999})], 1008)
        async with StreamClient(srv.url, format="s16le", sample_rate=8000, results="binary", include=("scores",)) as c:
            for a, b in random_cuts(len(pcm), 9):
                await c.send(pcm[a:b])
            summary = await c.end(timeout=TIMEOUT)
    tokens = mu_law_encode(torch.from_numpy(pcm.astype(np.float32) / 32768.0))
    model = load_for_serving(ckpts["audio"]).model
    with torch.no_grad():
        logp = F.log_softmax(model(tokens.unsqueeze(0))[0][0].float(), -1)
    prev = torch.cat([torch.full((1, 256), -math.log(256)), logp[:-1]])
    expected = prev.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).numpy()
    assert c.outputs() is None
    np.testing.assert_allclose(c.scores(), expected, rtol=1e-5, atol=1e-5)
    assert summary["bits_per_token"] == pytest.approx(-expected.astype(np.float64).mean() / math.log(2), rel=1e-4)


async def test_the_summary_averages_the_tokens_training_scored(ckpts, tmp_path):
    """Regression (README walk): a DNA model trained with mask_n (its test/bpt leaves N bases out)
    summarized a streamed chromosome over every base, N included (1.77 vs test/bpt 1.70 bits). The
    summary now leaves out what training left out and says how many tokens it averages; a model
    without mask_n still averages every token."""
    torch.manual_seed(1)  # the "dna" fixture's weights, with mask_n recorded
    cfg = ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", d_model=16, n_layers=2, d_state=8,
                      headdim=8, chunk_size=4)
    masked = export_safetensors(SSMModel(cfg).eval(), tmp_path / "masked.safetensors",
                                spec={"modality": "dna", "mask_n": True})
    bases = random_bases(150, seed=12)
    keep = np.array([b != "N" for b in bases])
    assert 0 < (~keep).sum() < len(bases)
    for ckpt, scored in ((masked, keep), (ckpts["dna"], np.ones(len(bases), bool))):
        async with server(ckpt) as srv:
            client, summary = await stream_dna(srv.url, bases, seed=13)
        _, scores = offline_dna(ckpt, bases)
        np.testing.assert_allclose(client.scores(), scores, atol=2e-5, rtol=0)  # every base still scored
        assert summary["scored"] == int(scored.sum())
        want = -scores[scored].astype(np.float64).mean() / math.log(2)
        assert summary["bits_per_token"] == pytest.approx(want, rel=1e-4)


async def test_float_audio_at_integer_scale_is_refused_while_a_canary_streams(ckpts):
    """f32le frames holding PCM values (a client that forgot to scale int16) would all be clipped
    to +-1 by the mu-law encoding: the stream gets 1007 bad_samples naming the peak (AudioEncoder's
    check); overs that stay below the limit are taken; a canary on s16le streams on, exact."""
    rng = np.random.default_rng(4)
    pcm = (np.sin(np.arange(400) / 5.0) * 12000 + rng.normal(size=400) * 300).astype(np.int16)
    start = json.dumps({"type": "start", "format": "f32le", "sample_rate": 8000})
    async with server(ckpts["audio"]) as srv:
        async with StreamClient(srv.url, format="s16le", sample_rate=8000, results="binary", include=("scores",)) as canary:
            await canary.send(pcm[:200])
            got = await expect_error(srv.url, [start, pcm.astype("<f4").tobytes()], 1007)
            assert got["reason"] == "bad_samples" and "reach 1" in got["message"] and "1/32768" in got["message"]
            async with StreamClient(srv.url, format="f32le", sample_rate=8000, results="binary",
                                    include=("scores",)) as hot:
                await hot.send(np.array([0.5, 1.5, -1.9, 0.0], np.float32))
                assert (await hot.end(timeout=TIMEOUT))["chunks"] == 1
            await canary.send(pcm[200:])
            await canary.end(timeout=TIMEOUT)
    tokens = mu_law_encode(torch.from_numpy(pcm.astype(np.float32) / 32768.0))
    model = load_for_serving(ckpts["audio"]).model
    with torch.no_grad():
        logp = F.log_softmax(model(tokens.unsqueeze(0))[0][0].float(), -1)
    prev = torch.cat([torch.full((1, 256), -math.log(256)), logp[:-1]])
    np.testing.assert_allclose(canary.scores(), prev.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).numpy(),
                               rtol=1e-5, atol=1e-5)


async def test_bad_clients_get_errors_while_good_streams_continue(ckpts):
    bases = random_bases(120, seed=7)
    async with server(ckpts["sensor"], max_frame_bytes=4096, idle_timeout=1.0) as sensor_srv, \
               server(ckpts["dna"], max_frame_bytes=4096) as srv:
        good = asyncio.create_task(stream_dna(srv.url, bases, seed=8))
        start = json.dumps({"type": "start", "format": "text"})
        sstart = json.dumps({"type": "start", "format": "f32le", "channels": 3})
        cases = [
            (srv.url, [b"\x00\x01"], 1003),  # binary before start
            (srv.url, ["{not json"], 1007),
            (srv.url, ['{"type": "hello"}'], 1008),
            (srv.url, [json.dumps({"type": "start", "format": "text", "version": 99})], 1008),
            (srv.url, [json.dumps({"type": "start", "format": "mp3"})], 1003),
            (srv.url, [json.dumps({"type": "start", "format": "f32le", "channels": 1})], 1003),  # DNA model: text only
            (srv.url, [start, "ACGTXQ"], 1007),
            (srv.url, [start, b"ACGT"], 1003),
            (srv.url, [start, "A" * 5000], 1009),
            (srv.url, [start, '{"type": "rewind"}'], 1008),
            (srv.url, [json.dumps({"type": "start", "format": "text", "resume": "x" * 43})], 1008),
            (sensor_srv.url, [json.dumps({"type": "start", "format": "f32le", "channels": 2})], 1008),
            (sensor_srv.url, [sstart, b"\x00" * 10], 1007),  # not a whole number of 3-channel f32 samples
            (sensor_srv.url, [sstart, np.array([[0, np.nan, 1]], "<f4").tobytes()], 1007),
            (sensor_srv.url, [sstart, "ACGT"], 1003),
            (sensor_srv.url, [sstart], 1008),  # idle timeout
        ]
        results = await asyncio.gather(*(expect_error(u, m, code) for u, m, code in cases))
        assert [r["code"] for r in results] == [c for _, _, c in cases]
        # abrupt disconnects in the middle of streams
        for _ in range(3):
            ws = await connect(srv.url)
            await ws.send(start)
            await ws.recv()
            await ws.send("ACGT" * 10)
            ws.transport.abort()
        client, _ = await good
        assert (await http_get(f"http://127.0.0.1:{srv.port}/healthz"))[0] == 200
        _, _, metrics = await http_get(f"http://127.0.0.1:{srv.port}/metrics")
    logp, scores = offline_dna(ckpts["dna"], bases)
    np.testing.assert_allclose(client.outputs(), logp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(client.scores(), scores, atol=2e-5, rtol=0)
    assert 'streamssm_rejected_total{reason="bad_bases"} 1.0' in metrics


async def test_fuzzed_messages_never_break_the_server(ckpts):
    rng = random.Random(11)
    start = json.dumps({"type": "start", "format": "text"})
    junk = [b"", b"\xff" * 7, "", "{", "[]", "null", '{"type": 3}', '{"type": "end"}', "acgtn" * 3,
            "ACGT\u00e9", '{"type": "start", "format": "text"}', "{}" * 50, "N" * 3000, b"\x00" * 5000]

    async def bad_client(i):
        msgs = [start] if rng.random() < 0.5 else []
        msgs += [rng.choice(junk) for _ in range(rng.randint(1, 4))]
        try:
            async with connect(srv.url, open_timeout=TIMEOUT) as ws:
                for m in msgs:
                    await ws.send(m)
                if rng.random() < 0.3:
                    ws.transport.abort()
                    return None
                try:
                    async with asyncio.timeout(0.3):  # valid junk leaves the stream open: hang up then
                        async for _ in ws:
                            pass
                except TimeoutError:
                    return None
            return ws.close_code
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    bases = random_bases(200, seed=3)
    async with server(ckpts["dna"], max_frame_bytes=4096, max_streams=64) as srv:
        good = asyncio.create_task(stream_dna(srv.url, bases, seed=4))
        codes = []
        for batch in range(10):
            codes += await asyncio.gather(*(bad_client(batch * 20 + i) for i in range(20)))
        client, _ = await good
        assert (await http_get(f"http://127.0.0.1:{srv.port}/healthz"))[0] == 200
    assert set(codes) <= {None, 1000, 1003, 1007, 1008, 1009}, sorted(set(codes), key=str)
    logp, _ = offline_dna(ckpts["dna"], bases)
    np.testing.assert_allclose(client.outputs(), logp, atol=2e-5, rtol=0)


async def test_too_many_streams_is_try_again_later(ckpts):
    async with server(ckpts["dna"], max_streams=2) as srv:
        start = json.dumps({"type": "start", "format": "text"})
        held = [await connect(srv.url) for _ in range(2)]
        for ws in held:
            await ws.send(start)
            assert json.loads(await ws.recv())["type"] == "ready"
        got = await expect_error(srv.url, [start], 1013)
        assert got["reason"] == "too_many_streams"
        for ws in held:
            await ws.close()


async def test_health_metrics_and_auth(ckpts):
    async with server(ckpts["dna"], token="s3cret") as srv:
        base = f"http://127.0.0.1:{srv.port}"
        status, _, body = await http_get(base + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert (await http_get(base + "/metrics"))[0] == 401
        with pytest.raises(InvalidStatus) as err:
            async with connect(srv.url):
                pass
        assert err.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as err:
            async with connect(srv.url, additional_headers={"Authorization": "Bearer wrong"}):
                pass
        assert err.value.response.status_code == 401
        client, _ = await stream_dna(srv.url, "ACGTACGTNN", seed=1, token="s3cret")
        assert len(client.outputs()) == 10
        status, ctype, text = await http_get(base + "/metrics", {"Authorization": "Bearer s3cret"})
        assert status == 200 and ctype.startswith("text/plain")
        assert "streamssm_chunks_total" in text and 'streamssm_rejected_total{reason="unauthorized"} 3.0' in text
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("streamssm_")}
        # the engine thread's model and encoding seconds lie within the batches' wall time
        assert 0 < value["streamssm_model_seconds_total"]
        assert 0 < value["streamssm_encode_seconds_total"]
        assert value["streamssm_model_seconds_total"] + value["streamssm_encode_seconds_total"] \
            <= value["streamssm_batch_seconds_sum"]
        assert (await http_get(base + "/nope", {"Authorization": "Bearer s3cret"}))[0] == 404


async def test_serving_leaves_the_embedding_processs_garbage_collector_as_it_was(ckpts):
    """Serving freezes the objects alive at start and raises the young-collection threshold; two
    servers in one process (overlapping) put both back when the last stops, even stopped twice."""
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    first, second = server(ckpts["dna"]), server(ckpts["sensor"])
    await first.start()
    tuned = gc.get_threshold()
    assert tuned[0] == 10_000 and gc.get_freeze_count() > 0
    await second.start()
    await first.stop()
    await first.stop()
    assert gc.get_threshold() == tuned and gc.get_freeze_count() > 0  # the second still serves
    await second.stop()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


@pytest.mark.parametrize("failure", ["port_taken", "bad_tls"])
async def test_a_server_that_fails_to_start_stops_what_it_started(ckpts, tmp_path, failure):
    """Regression: a start that failed after the engine started (port in use, a TLS file missing)
    left the engine thread running and the collector frozen, since ``async with`` calls no stop
    when entering fails (Python 3.12's run of the suite then failed the collector test above)."""
    def engines() -> int:
        return sum(t.name.startswith("streamssm-engine") for t in threading.enumerate())

    before, engines_before = gc.get_threshold(), engines()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        kw = ({"port": taken.getsockname()[1]} if failure == "port_taken"
              else {"certfile": str(tmp_path / "missing.pem"), "keyfile": str(tmp_path / "missing.key")})
        with pytest.raises(OSError if failure == "port_taken" else ConfigError):
            async with server(ckpts["dna"], **kw):
                pass
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert engines() == engines_before


async def test_resume_after_disconnect_equals_uninterrupted(ckpts):
    bases = random_bases(150, seed=21)
    cuts = random_cuts(len(bases), 22)
    async with server(ckpts["dna"]) as srv:
        async with StreamClient(srv.url, format="text", window=4) as c:
            for i, (a, b) in enumerate(cuts):
                await c.send(bases[a:b])
                if i in (5, 20):  # the network drops with chunks in flight
                    c._ws.transport.abort()
            await c.end(timeout=TIMEOUT)
        resumed = srv.metrics.resumed._value.get()
    assert c.reconnects == 2 and resumed == 2
    logp, scores = offline_dna(ckpts["dna"], bases)
    np.testing.assert_allclose(c.outputs(), logp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(c.scores(), scores, atol=2e-5, rtol=0)


async def test_resume_after_server_restart_with_state_dir(ckpts, tmp_path):
    bases = random_bases(90, seed=31)
    cuts = random_cuts(len(bases), 32)
    state = tmp_path / "state"
    async with server(ckpts["dna"], state_dir=str(state), token="t0k") as first:
        c = StreamClient(first.url, format="text", token="t0k", reconnect=8)
        await c.__aenter__()
        for a, b in cuts[: len(cuts) // 2]:
            await c.send(bases[a:b])
    # first server is gone (closed streams with 1012 and wrote them to the state dir)
    assert len(list(state.glob("*.safetensors"))) == 1
    token = c.resume_token
    async with server(ckpts["dna_other"], state_dir=str(state), token="t0k") as other:  # another model: refused
        got = await expect_error(other.url, [json.dumps({"type": "start", "format": "text", "resume": token})], 1008,
                                 headers={"Authorization": "Bearer t0k"})
        assert got["reason"] == "bad_resume"
    async with server(ckpts["dna"], state_dir=str(state), token="t0k") as second:
        c.url = second.url
        for a, b in cuts[len(cuts) // 2 :]:
            await c.send(bases[a:b])
        await c.end(timeout=TIMEOUT)
        await c.close()
    assert c.reconnects >= 1
    logp, scores = offline_dna(ckpts["dna"], bases)
    np.testing.assert_allclose(c.outputs(), logp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(c.scores(), scores, atol=2e-5, rtol=0)


async def test_resume_token_is_bound_to_its_bearer_token(ckpts, tmp_path):
    state = str(tmp_path / "state")
    async with server(ckpts["dna"], token="alice", state_dir=state) as srv:
        async with StreamClient(srv.url, format="text", token="alice") as c:
            await c.send("ACGT")
            await c._wait_until(lambda: not c._pending)
    token = c.resume_token  # the client hung up without "end": the stream was parked in the state dir
    start = json.dumps({"type": "start", "format": "text", "resume": token, "ack": 0})
    async with server(ckpts["dna"], token="mallory", state_dir=state) as srv:  # another bearer: unknown token
        await expect_error(srv.url, [start], 1008, headers={"Authorization": "Bearer mallory"})
    async with server(ckpts["dna"], token="alice", state_dir=state) as srv:  # its own bearer: resumes
        async with connect(srv.url, additional_headers={"Authorization": "Bearer alice"}) as ws:
            await ws.send(start)
            ready = json.loads(await ws.recv())
    assert ready["type"] == "ready" and ready["resumed"] and ready["next_seq"] == 1 and ready["samples"] == 4


async def test_stream_cli_library_on_fasta(ckpts, tmp_path):
    bases = random_bases(70, seed=41)
    fasta = tmp_path / "x.fa"
    fasta.write_text(">chrT test\n" + "\n".join(bases[i : i + 30] for i in range(0, 70, 30)) + "\n")
    source = read_source(fasta)
    assert source.format == "text" and source.data == bases
    async with server(ckpts["dna"]) as srv:
        client, summary = await stream_source(source, srv.url, chunk=16, results="binary")
        out = tmp_path / "r.npz"
        from streamssm.commands.stream import main as stream_main

        rc = await asyncio.to_thread(stream_main, [str(fasta), "--url", srv.url, "--chunk", "9", "--out", str(out)])
    assert rc == 0
    logp, scores = offline_dna(ckpts["dna"], bases)
    np.testing.assert_allclose(client.outputs(), logp, rtol=1e-5, atol=1e-5)
    saved = np.load(out)
    np.testing.assert_allclose(saved["outputs"], logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(saved["scores"], scores, rtol=1e-5, atol=1e-5)
    assert summary["samples"] == 70


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_serve_cli_sigterm_is_graceful(ckpts, event_loop):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamssm.cli", "serve", "--checkpoint", str(ckpts["dna"]), "--port", "0",
         "--event-loop", event_loop],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        port = None
        for line in proc.stderr:
            if "listening on ws://" in line:
                port = int(line.split("listening on ws://127.0.0.1:")[1].split("/")[0])
                assert f"{event_loop} event loop" in line
                break
        assert port, "server did not start"
        status, _, body = _http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        bases = random_bases(50, 3)
        client, _ = asyncio.run(stream_dna(f"ws://127.0.0.1:{port}/", bases, 4))
        np.testing.assert_allclose(client.scores(), offline_dna(ckpts["dna"], bases)[1], atol=2e-5, rtol=0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------ the scheduler alone


def _streamer(path, capacity=4):
    from streamssm.inference import Streamer

    return Streamer(load_for_serving(path).model, capacity)


class _CountingEncoder:
    """Scheduler encoder for tests: a chunk's message is its number of output rows."""

    def part(self, chunk, result):
        return result.outputs.shape[0]

    def finish(self, chunk, parts):
        return sum(parts)


async def _open(sched, sent, name):
    def deliver(chunk, rows):
        sent.append((name, chunk.seq, rows))

    def on_error(exc):
        sent.append((name, "error", type(exc).__name__))

    return await sched.open(_CountingEncoder(), deliver, on_error)


@pytest.mark.parametrize("batching, expected_calls", [
    ("greedy", [[2, 3, 4]]),  # one call: every stream's pending chunks concatenated in time
    ("uniform", [[2, 2, 2], [1, 1], [1]]),  # equal chunk counts per call: one length per call
])
async def test_scheduler_batches_all_pending_streams_into_one_call(ckpts, batching, expected_calls):
    from streamssm.service.scheduler import Chunk, Scheduler

    streamer = _streamer(ckpts["dna"])
    calls = []
    real = streamer.launch
    streamer.launch = lambda chunks, outputs=True: (calls.append(sorted(len(v) for v in chunks.values())), real(chunks, outputs))[1]
    sched, sent = Scheduler(streamer, queue_depth=4, batching=batching), []
    await sched.start()
    try:
        sids = [await _open(sched, sent, i) for i in range(3)]
        for k, sid in enumerate(sids):  # all queued before the engine runs: stream k has k+2 one-token chunks
            for seq in range(k + 2):
                await sched.submit(sid, Chunk(seq, seq, torch.tensor([seq % 5])))
        async with asyncio.timeout(TIMEOUT):
            while len(sent) < 9:
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert calls == expected_calls
    assert sorted(sent) == sorted([(i, s, 1) for i in range(3) for s in range(i + 2)])


@pytest.mark.parametrize("as_numpy", [False, True])
async def test_numpy_chunks_compute_as_tensor_chunks(ckpts, as_numpy):
    """The serve --workers engine process queues numpy views of its link messages (no torch call
    on its event loop): pieces cut from them and joined across chunks (greedy batching, 5-sample
    slices over 3- to 7-sample chunks) give the outputs a Streamer fed the whole stream gives,
    whether a call's arrays go up stacked as one (equal lengths: ``Streamer.launch_stacked``) or
    one by one (the last call: 3 samples of one stream beside 5 of the other)."""
    from streamssm.service.scheduler import Chunk, Scheduler

    lengths = [(3, 4, 5, 1), (3, 4, 7, 1)]  # 13 and 15 samples: calls of 5 + 5, 5 + 5, 3 + 5
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 5, (sum(ls),), generator=gen) for ls in lengths]
    streamer = _streamer(ckpts["dna"])
    calls = []
    launch, launch_stacked = streamer.launch, streamer.launch_stacked
    streamer.launch = lambda chunks, outputs=True: (calls.append("each"), launch(chunks, outputs))[1]
    streamer.launch_stacked = lambda ids, x, outputs=True: (calls.append("stacked"), launch_stacked(ids, x, outputs))[1]
    sched = Scheduler(streamer, queue_depth=8, batching="greedy", slice_samples=5)
    sent, errors = {0: [], 1: []}, []
    await sched.start()
    try:
        sids = [await sched.open(_RowsEncoder(), lambda chunk, rows, i=i: sent[i].append(rows), errors.append)
                for i in range(2)]
        for sid, row, ls in zip(sids, tokens, lengths):  # every chunk queued before the engine runs (no await)
            for seq, (start, x) in enumerate(zip(itertools.accumulate((0,) + ls), row.split(ls))):
                assert sched.submit_nowait(sid, Chunk(seq, start, x.numpy().copy() if as_numpy else x.clone()))
        async with asyncio.timeout(TIMEOUT):
            while sum(len(v) for v in sent.values()) < sum(map(len, lengths)) and not errors:
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert not errors
    assert calls == (["stacked", "stacked", "each"] if as_numpy else ["each"] * 3)
    reference = _streamer(ckpts["dna"])
    for i, row in enumerate(tokens):
        expected = reference.feed(reference.open(), row).outputs
        torch.testing.assert_close(torch.cat(sent[i]), expected, rtol=1e-5, atol=1e-5)


async def test_default_settings_run_a_20_ms_frame_of_every_stream_in_one_call(ckpts):
    """Regression (GPU service sweep, 128 clients at 0.36x real time): with 256-sample slices every
    20 ms frame at 16 kHz (320 samples) took two model calls (256 + 64), and streams caught between
    the two dragged every call down to their 64-sample leftovers."""
    from streamssm.service.config import ServeConfig
    from streamssm.service.scheduler import Chunk, Scheduler

    streamer = _streamer(ckpts["dna"])
    calls = []
    real = streamer.launch
    streamer.launch = lambda chunks, outputs=True: (calls.append(sorted(len(v) for v in chunks.values())), real(chunks, outputs))[1]
    sched, sent = Scheduler(streamer, slice_samples=ServeConfig().slice_samples), []
    await sched.start()
    try:
        sids = [await _open(sched, sent, i) for i in range(3)]
        for rnd in range(2):
            for sid in sids:
                await sched.submit(sid, Chunk(rnd, 320 * rnd, torch.randint(0, 5, (320,))))
            async with asyncio.timeout(TIMEOUT):
                while len(sent) < 3 * (rnd + 1):
                    await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert all(n == 320 for call in calls for n in call) and sum(len(c) for c in calls) == 6
    assert sorted(sent) == sorted([(i, s, 320) for i in range(3) for s in range(2)])


async def test_batch_wait_lets_staggered_streams_share_one_call(ckpts):
    """serve --batch-wait: the idle engine waits for the streams with nothing pending, so chunks
    that arrive a little apart go in one model call (without it: one call per arrival)."""
    from streamssm.service.scheduler import Chunk, Scheduler

    streamer = _streamer(ckpts["dna"])
    calls = []
    real = streamer.launch
    streamer.launch = lambda chunks, outputs=True: (calls.append(sorted(chunks)), real(chunks, outputs))[1]
    sched, sent = Scheduler(streamer, batch_wait=5.0), []
    await sched.start()
    try:
        sids = [await _open(sched, sent, i) for i in range(3)]
        for sid in sids:  # staggered arrivals, well inside the window
            await sched.submit(sid, Chunk(0, 0, torch.randint(0, 5, (8,))))
            await asyncio.sleep(0.05)
        async with asyncio.timeout(TIMEOUT):
            while len(sent) < 3:
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert calls == [sorted(sids)]


def test_batch_wait_is_bounded():
    from streamssm.service.config import ServeConfig
    from streamssm.service.scheduler import Scheduler

    with pytest.raises(ConfigError, match="batch_wait must be 0..1 seconds"):
        ServeConfig(batch_wait=-0.001)
    with pytest.raises(ConfigError, match="batch_wait must be 0..1 seconds"):
        ServeConfig(batch_wait=5)  # a paused client would stall every other stream this long
    with pytest.raises(ConfigError, match="batch_wait must be >= 0"):
        Scheduler(None, batch_wait=float("nan"))


def test_pipeline_fill_is_bounded():
    from streamssm.service.config import ServeConfig
    from streamssm.service.scheduler import Scheduler

    for bad in (-0.5, 100.0, float("nan")):
        with pytest.raises(ConfigError, match="pipeline_fill must be 0..64"):
            ServeConfig(pipeline_fill=bad)
    with pytest.raises(ConfigError, match="pipeline_fill must be >= 0"):
        Scheduler(None, pipeline_fill=float("nan"))
    assert ServeConfig(pipeline_fill=2.0).pipeline_fill == 2.0


def test_scheduler_defaults_are_the_server_config_defaults():
    """A Scheduler built from Python (benches, tests) batches as `streamssm serve` does by default:
    its keyword defaults are ServeConfig's, not literals of its own that drift (pipeline_fill once did)."""
    from streamssm.service.config import ServeConfig
    from streamssm.service.scheduler import Scheduler

    sched, cfg = Scheduler(None), ServeConfig()
    for knob in ("queue_depth", "batching", "slice_samples", "batch_wait", "pipeline_fill"):
        assert getattr(sched, knob) == getattr(cfg, knob), knob


async def test_backpressure_slows_only_the_stream_that_does_not_drain(ckpts):
    from streamssm.service.scheduler import Chunk, Scheduler

    sched, sent = Scheduler(_streamer(ckpts["dna"]), queue_depth=2), []
    await sched.start()
    try:
        slow, fast = await _open(sched, sent, "slow"), await _open(sched, sent, "fast")
        # "slow" never has its results sent (done() never called): after queue_depth chunks it blocks
        await sched.submit(slow, Chunk(0, 0, torch.tensor([1])))
        await sched.submit(slow, Chunk(1, 1, torch.tensor([2])))
        blocked = asyncio.create_task(sched.submit(slow, Chunk(2, 2, torch.tensor([3]))))
        # meanwhile "fast" streams 20 chunks, releasing each slot as its result is "sent"
        for i in range(20):
            await sched.submit(fast, Chunk(i, i, torch.tensor([i % 5])))
            async with asyncio.timeout(TIMEOUT):
                while sum(1 for s in sent if s[0] == "fast") <= i:
                    await asyncio.sleep(0.001)
            sched.done(fast)
        assert not blocked.done()
        sched.done(slow)  # the client finally reads one result: one slot frees
        async with asyncio.timeout(TIMEOUT):
            await blocked
            while sum(1 for s in sent if s[0] == "slow") < 3:
                await asyncio.sleep(0.001)
    finally:
        await sched.stop()
    assert [s[1] for s in sent if s[0] == "slow"] == [0, 1, 2]


async def test_a_failing_stream_does_not_take_others_down(ckpts):
    from streamssm.service.scheduler import Chunk, Scheduler

    streamer = _streamer(ckpts["dna"])
    sched, sent = Scheduler(streamer, queue_depth=4), []
    await sched.start()
    try:
        good, bad = await _open(sched, sent, "good"), await _open(sched, sent, "bad")
        real = streamer.launch

        def flaky(chunks, outputs=True):  # the model call fails whenever the "bad" stream is in it
            if bad in chunks:
                raise RuntimeError("device fault")
            return real(chunks, outputs)

        streamer.launch = flaky
        await sched.submit(good, Chunk(0, 0, torch.tensor([1, 2])))
        await sched.submit(bad, Chunk(0, 0, torch.tensor([3])))
        async with asyncio.timeout(TIMEOUT):
            while len(sent) < 2:
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert sorted(sent, key=str) == sorted([("good", 0, 2), ("bad", "error", "RuntimeError")], key=str)


class _LoggedCalls:
    """Wraps a Streamer's launch: logs ("launch", k) and ("collect", k) for every call k, and
    holds collection ``gate_at`` until ``gate`` is set (a call left in flight on purpose)."""

    def __init__(self, streamer, gate_at=None):
        import threading

        self.events, self.real, self.gate_at, self.gate = [], streamer.launch, gate_at, threading.Event()
        streamer.launch = self.launch

    def launch(self, chunks, outputs=True):
        k = sum(1 for e in self.events if e[0] == "launch")
        self.events.append(("launch", k))
        pending = self.real(chunks, outputs)
        result = pending.result

        def logged_result():
            self.events.append(("collect", k))
            if k == self.gate_at:
                assert self.gate.wait(TIMEOUT)
            return result()

        pending.result = logged_result
        return pending

    async def reached(self, event) -> None:
        async with asyncio.timeout(TIMEOUT):
            while event not in self.events:
                await asyncio.sleep(0.005)


class _RowsEncoder:
    """Scheduler encoder for tests: a chunk's message is its output rows (n, o)."""

    def part(self, chunk, result):
        return result.outputs.clone()

    def finish(self, chunk, parts):
        return torch.cat(parts)


async def test_engine_launches_the_next_call_before_collecting_the_previous(ckpts):
    """The engine pipelines its calls (on a GPU the host work of one overlaps the device work of
    the other): a 10-token chunk in 4-token slices is launched, launched, collected, launched,
    collected, collected, and its outputs equal one offline call."""
    from streamssm.service.scheduler import Chunk, Scheduler

    streamer, offline = _streamer(ckpts["dna"]), _streamer(ckpts["dna"])
    calls = _LoggedCalls(streamer)
    sched, sent = Scheduler(streamer, slice_samples=4), []
    x = torch.tensor([0, 1, 2, 3, 4, 3, 2, 1, 0, 1])
    await sched.start()
    try:
        sid = await sched.open(_RowsEncoder(), lambda chunk, rows: sent.append(rows), sent.append)
        await sched.submit(sid, Chunk(0, 0, x))
        async with asyncio.timeout(TIMEOUT):
            while not sent:
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert calls.events == [("launch", 0), ("launch", 1), ("collect", 0), ("launch", 2), ("collect", 1),
                            ("collect", 2)]
    expected = offline.feed(offline.open(), x).outputs
    torch.testing.assert_close(sent[0], expected, rtol=1e-5, atol=1e-5)


EARLY = [("launch", 0), ("launch", 1), ("collect", 0), ("collect", 1)]  # launched before collecting
LATE = [("launch", 0), ("collect", 0), ("launch", 1), ("collect", 1)]  # collected first: one bigger call later


@pytest.mark.parametrize("fill, backlogged, expected", [
    (0.5, 1, LATE),  # --pipeline-fill 0.5: 1 of 4 streams is not enough
    (0.5, 2, EARLY),  # 2 of 4 are
    (1.0, 2, LATE),  # 1: as many streams as the call in flight holds
    (1.0, 4, EARLY),
    (2.0, 2, LATE),  # the default, 2: twice as many ...
    (2.0, 4, EARLY),  # ... or all live streams (4 of 4: waiting would gather no more)
])
async def test_next_call_goes_out_early_only_while_streams_are_backlogged(ckpts, fill, backlogged, expected):
    from streamssm.service.scheduler import Chunk, Scheduler

    streamer = _streamer(ckpts["dna"])
    calls = _LoggedCalls(streamer)
    sched, sent = Scheduler(streamer, queue_depth=4, slice_samples=3, pipeline_fill=fill), []  # a chunk a call
    await sched.start()
    try:
        sids = [await _open(sched, sent, i) for i in range(4)]
        for i, sid in enumerate(sids):  # all queued before the engine runs
            for seq in range(2 if i < backlogged else 1):
                await sched.submit(sid, Chunk(seq, 3 * seq, torch.tensor([1, 2, 3])))
        async with asyncio.timeout(TIMEOUT):
            while len(sent) < 4 + backlogged:
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert calls.events == expected


async def _gated_stream(ckpts):
    """A started Scheduler (4-token slices) whose first collection waits for ``calls.gate``, with
    one stream open whose results go to ``sent`` as (seq, rows); and an offline streamer of the
    same model. Returns (offline, calls, scheduler, stream id, sent)."""
    from streamssm.service.scheduler import Scheduler

    streamer, offline = _streamer(ckpts["dna"]), _streamer(ckpts["dna"])
    calls = _LoggedCalls(streamer, gate_at=0)
    sched, sent = Scheduler(streamer, slice_samples=4), []
    await sched.start()
    sid = await sched.open(_RowsEncoder(), lambda chunk, rows: sent.append((chunk.seq, rows)), sent.append)
    return offline, calls, sched, sid, sent


async def test_snapshots_wait_for_launched_calls_to_be_collected(ckpts):
    """Regression (pipelined engine): a stream's chunks can be computed by calls not yet
    collected; a checkpoint then would cover chunks whose results were never delivered, and a
    close with snapshot dropped the last results of a chunk it had waited for."""
    from streamssm.service.scheduler import Chunk

    offline, calls, sched, sid, sent = await _gated_stream(ckpts)
    x = torch.tensor([0, 1, 2, 3, 4, 3, 2, 1])
    try:
        await sched.submit(sid, Chunk(0, 0, x[:4]))
        await sched.submit(sid, Chunk(1, 4, x[4:]))
        await calls.reached(("collect", 0))  # both chunks launched, neither collected
        assert sched._checkpoint(sid) is None
        closing = asyncio.ensure_future(sched.close(sid, snapshot=True))
        await asyncio.sleep(0.05)
        assert not closing.done()
        calls.gate.set()
        async with asyncio.timeout(TIMEOUT):
            blob = await closing
    finally:
        calls.gate.set()
        await sched.stop()
    assert [seq for seq, _ in sent] == [0, 1]  # every result delivered before the snapshot
    both = offline.open()
    offline.feed(both, x)
    resumed, nxt = offline.restore(blob), torch.tensor([2, 2, 4])
    torch.testing.assert_close(offline.feed(resumed, nxt).outputs, offline.feed(both, nxt).outputs,
                               rtol=1e-5, atol=1e-5)


async def test_a_stopped_engine_leaves_no_close_waiting_on_its_launched_calls(ckpts):
    """A close with snapshot waits for launched calls of its stream; when the engine loop is
    stopped with such a call never collected, the close goes on instead of waiting forever."""
    from streamssm.service.scheduler import Chunk

    _, calls, sched, sid, _ = await _gated_stream(ckpts)
    try:
        await sched.submit(sid, Chunk(0, 0, torch.tensor([0, 1, 2, 3, 4, 3, 2, 1])))
        await calls.reached(("collect", 0))
        closing = asyncio.ensure_future(sched.close(sid, snapshot=True))
        await asyncio.sleep(0.05)
        assert not closing.done()
        sched._task.cancel()
        calls.gate.set()
        async with asyncio.timeout(TIMEOUT):
            assert await closing  # the snapshot of what the launched calls computed
    finally:
        calls.gate.set()
        await sched.stop()


async def test_reset_waits_for_launched_calls_of_its_stream(ckpts):
    """Regression (pipelined engine): a reset between a call's launch and its collection moved
    the stream to a new id, and the collected results of its last chunk were dropped."""
    from streamssm.service.scheduler import Chunk

    offline, calls, sched, sid, sent = await _gated_stream(ckpts)
    x = torch.tensor([0, 1, 2, 3, 4, 3, 2, 1])
    try:
        await sched.submit(sid, Chunk(0, 0, x))
        await calls.reached(("collect", 0))  # the chunk's two slices launched, none collected
        resetting = asyncio.ensure_future(sched.reset(sid, 1))
        await asyncio.sleep(0.05)
        assert not resetting.done()
        calls.gate.set()
        async with asyncio.timeout(TIMEOUT):
            new = await resetting
            await sched.submit(new, Chunk(1, 0, x))
            while len(sent) < 2:
                await asyncio.sleep(0.01)
    finally:
        calls.gate.set()
        await sched.stop()
    assert [seq for seq, _ in sent] == [0, 1]
    torch.testing.assert_close(sent[1][1], offline.feed(offline.open(), x).outputs, rtol=1e-5, atol=1e-5)


async def test_checkpoint_covers_exactly_the_delivered_chunks(ckpts):
    from streamssm.service.scheduler import Chunk, Scheduler

    streamer = _streamer(ckpts["dna"])
    sched, sent = Scheduler(streamer, slice_samples=4), []
    await sched.start()
    try:
        sid = await sched.open(_RowsEncoder(), lambda chunk, rows: sent.append(chunk.seq), sent.append)
        for seq in range(3):
            await sched.submit(sid, Chunk(seq, 4 * seq, torch.tensor([seq, 1, 2, 3])))
        async with asyncio.timeout(TIMEOUT):
            while len(sent) < 3:
                await asyncio.sleep(0.01)
        _, chunks, samples = await sched.checkpoint(sid)
    finally:
        await sched.stop()
    assert (chunks, samples) == (3, 12)


async def test_an_encoder_that_fails_fails_its_stream_only(ckpts):
    """Regression: an encoder that raised made the whole call fail and every stream of it run
    again one by one, so the others' states advanced twice over the same chunk; now only the
    stream whose results cannot be encoded fails, and the others' next results stay exact."""
    from streamssm.service.scheduler import Chunk, Scheduler

    class Broken(_RowsEncoder):
        def part(self, chunk, result):
            raise ValueError("cannot encode")

    streamer, offline = _streamer(ckpts["dna"]), _streamer(ckpts["dna"])
    sched, sent = Scheduler(streamer), []
    x = torch.tensor([1, 2, 3, 0, 4, 4])
    await sched.start()
    try:
        good = await sched.open(_RowsEncoder(), lambda chunk, rows: sent.append(("good", chunk.seq, rows)),
                                lambda exc: sent.append(("good", "error", exc)))
        bad = await sched.open(Broken(), lambda chunk, rows: sent.append(("bad", chunk.seq, rows)),
                               lambda exc: sent.append(("bad", "error", type(exc).__name__)))
        await sched.submit(good, Chunk(0, 0, x[:3]))
        await sched.submit(bad, Chunk(0, 0, x[:3]))
        async with asyncio.timeout(TIMEOUT):
            while len(sent) < 2:
                await asyncio.sleep(0.01)
            await sched.submit(good, Chunk(1, 3, x[3:]))
            while len(sent) < 3:
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    assert ("bad", "error", "ValueError") in sent
    rows = torch.cat([r for name, seq, r in sorted((e for e in sent if e[0] == "good"), key=lambda e: e[1])])
    torch.testing.assert_close(rows, offline.feed(offline.open(), x).outputs, rtol=1e-5, atol=1e-5)


def test_read_source_wav_and_csv(tmp_path):
    import soundfile as sf

    from streamssm.errors import DataFormatError

    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros((100, 2), np.float32) + 0.25, 8000)
    src = read_source(wav)
    assert (src.format, src.sample_rate, src.channels, src.data.shape) == ("f32le", 8000, 2, (100, 2))
    assert [len(c) for c in src.chunks(40)] == [40, 40, 20]
    csv = tmp_path / "s.csv"
    csv.write_text("t,name,a,b\n0,x,1.5,2\n1,y,2.5,3\n")
    src = read_source(csv, columns=["a", "b"], sample_rate=10)
    assert (src.format, src.channels, src.sample_rate) == ("f32le", 2, 10)
    np.testing.assert_array_equal(src.data, [[1.5, 2.0], [2.5, 3.0]])
    assert read_source(csv).channels == 3  # numeric columns t, a, b
    with pytest.raises(DataFormatError, match="columns"):
        read_source(csv, columns=["nope"])
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataFormatError, match="unsupported"):
        read_source(tmp_path / "x.txt")


def test_chunk_latency_histogram_fed_in_batches_reads_as_prometheus_own():
    """The chunk-latency histogram takes one model call's latencies at once (the client library's
    per-observation cost was ~3 us a chunk on the event loop); /metrics shows exactly what a
    prometheus_client Histogram fed one value at a time shows (bounds hit exactly included)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from streamssm.service.metrics import _LATENCY_BUCKETS, ServiceMetrics

    values = [0.0004, 0.001, 0.0031, 0.02, 0.02, 0.7, 3.0, 12.5]
    ours = ServiceMetrics()
    ours.observe_chunks(values[:3])
    ours.observe_chunks([])
    ours.observe_chunks(values[3:])
    registry = CollectorRegistry()
    theirs = Histogram("streamssm_chunk_latency_seconds", "x", buckets=_LATENCY_BUCKETS, registry=registry)
    for v in values:
        theirs.observe(v)

    def lines(text: bytes) -> list[str]:
        return [ln for ln in text.decode().splitlines()
                if ln.startswith("streamssm_chunk_latency_seconds_") and "_created" not in ln]

    assert lines(ours.render()) == lines(generate_latest(registry)) and len(lines(ours.render())) == 15
    assert "streamssm_chunks_total 8.0" in ours.render().decode()


async def test_queue_slots_first_come_first_served_and_cancellation_safe():
    """QueueSlots (a counter and futures, not an asyncio.Semaphore, so the engine process takes a
    slot per chunk without a coroutine): at most depth unanswered; waiters served in order; a
    waiter cancelled while waiting leaves no trace (a later caller still gets a free slot at
    once), one cancelled just as its slot came hands the slot on; drain waits for every answer."""
    from streamssm.service.scheduler import QueueSlots

    slots, order = QueueSlots(2), []
    assert slots.try_acquire() and slots.try_acquire() and not slots.try_acquire()

    async def take(name):
        await slots.acquire()
        order.append(name)

    first, second, third = (asyncio.ensure_future(take(n)) for n in ("first", "second", "third"))
    await asyncio.sleep(0)
    second.cancel()
    await asyncio.sleep(0)
    slots.answered()
    await asyncio.sleep(0)
    assert order == ["first"] and slots.unanswered == 2 and not slots.try_acquire()
    slots.answered()
    await asyncio.sleep(0)
    assert order == ["first", "third"] and third.done()
    # a waiter whose slot is granted in the same turn it is cancelled gives it back
    late = asyncio.ensure_future(take("late"))
    await asyncio.sleep(0)
    slots.answered()  # grants "late" its slot ...
    late.cancel()  # ... but it is cancelled before it runs
    await asyncio.gather(late, return_exceptions=True)
    assert order == ["first", "third"] and slots.unanswered == 1 and slots.try_acquire()
    drained = asyncio.ensure_future(slots.drain())
    await asyncio.sleep(0)
    slots.answered()
    await asyncio.sleep(0)
    assert not drained.done()
    slots.answered()
    await asyncio.wait_for(drained, TIMEOUT)
    assert slots.unanswered == 0 and first.done() and second.cancelled()
