"""What real clients need from the service (issue 23): keepalive pings, reset, G.711 mu-law
input, any input sample rate (streaming resampler), the stereo rule, TLS, the CLI client.

Resampling tolerance: a stream's frames, resampled frame by frame, equal the whole recording
resampled at once to RESAMPLE_ATOL (soxr carries its filter state; it is bit-exact in
practice); streamed results then equal the offline forward of the resampled recording to fp32
tolerance (OUT_ATOL).
"""

import asyncio
import datetime
import ipaddress
import json
import math
import shutil
import ssl

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from test_service_server import random_cuts, read_error, server
from websockets.asyncio.client import connect

from streamssm.checkpoint import export_safetensors, load_for_serving
from streamssm.encoding import encode_bases, mu_law_encode
from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ModelConfig, SSMModel
from streamssm.service.client import StreamClient, server_sample_rate
from streamssm.service.protocol import MULAW8_TO_FLOAT
from streamssm.service.resample import StreamResampler, resample

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 20.0
RESAMPLE_ATOL = 1e-6
OUT_ATOL = 2e-5
SMALL = dict(d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=4)


def _export(tmp, name, cfg, serving, seed):
    torch.manual_seed(seed)
    return export_safetensors(SSMModel(cfg).eval(), tmp / f"{name}.safetensors", spec=serving)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    return {
        "dna": _export(tmp, "dna", ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", **SMALL),
                       {"modality": "dna"}, 1),
        "mulaw": _export(tmp, "mulaw", ModelConfig(block="mamba", input_kind="tokens", vocab_size=256, head="lm", **SMALL),
                         {"modality": "audio", "sample_rate": 8000, "encoding": "mu_law"}, 2),
        # float audio: results depend smoothly on the samples (no mu-law quantization steps)
        "float": _export(tmp, "float", ModelConfig(block="mamba", input_kind="continuous", input_dim=1,
                                                   head="regression", output_dim=1, **SMALL),
                         {"modality": "audio", "sample_rate": 8000, "encoding": "float"}, 3),
    }


def cuts(n: int, seed: int, sizes=(1, 7, 50, 160, 441, 882, 2000)) -> list[tuple[int, int]]:
    """Random frame boundaries over n samples, from single samples to 45 ms at 44.1 kHz."""
    return random_cuts(n, seed, sizes)


def tone(n: int, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(n, channels) float32 test audio: two tones and some noise, within [-1, 1]."""
    t = np.arange(n)[:, None] / rate
    rng = np.random.default_rng(seed)
    x = 0.4 * np.sin(2 * np.pi * 440 * t * (1 + np.arange(channels))) + 0.2 * np.sin(2 * np.pi * 3100 * t)
    return (x + 0.05 * rng.standard_normal((n, channels))).astype(np.float32)


def offline_float(path, x: np.ndarray) -> np.ndarray:
    """Offline full forward of the float audio model over samples (l, 1) at its rate: (l, 1)."""
    model = load_for_serving(path).model
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0))[0][0].numpy()


def offline_lm(path, tokens: torch.Tensor, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Offline full forward of a token LM: log-probs (l, vocab) and each token's score (l,)."""
    model = load_for_serving(path).model
    with torch.no_grad():
        logp = F.log_softmax(model(tokens.unsqueeze(0))[0][0].float(), -1)
    prev = torch.cat([torch.full((1, vocab), -math.log(vocab)), logp[:-1]])
    return logp.numpy(), prev.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).numpy()


# ------------------------------------------------------------------------------ G.711 mu-law


def test_mulaw8_decoding_matches_g711_code_points():
    pcm = np.round(MULAW8_TO_FLOAT * 32768).astype(np.int32)
    # G.711 mu-law: codes are stored inverted; 0x80..0xFF positive, 0x00..0x7F negative
    known = {0xFF: 0, 0x7F: 0, 0x00: -32124, 0x80: 32124, 0xF0: 120, 0x70: -120, 0xEF: 132, 0xDF: 396,
             0xCF: 924, 0x8F: 16764, 0x0F: -16764}
    assert {code: int(pcm[code]) for code in known} == known
    assert np.all(np.diff(pcm[0x80:]) < 0) and np.all(np.diff(pcm[:0x80]) > 0)  # |value| falls with the code
    np.testing.assert_array_equal(pcm[0x80:], -pcm[:0x80])  # sign-symmetric


@pytest.mark.parametrize("workers", [1, 2])
async def test_mulaw8_stream_equals_offline_forward_of_decoded_audio(ckpts, workers):
    codes = np.random.default_rng(5).integers(0, 256, 300).astype(np.uint8)
    async with server(ckpts["mulaw"], workers=workers) as srv:
        async with StreamClient(srv.url, format="mulaw8", sample_rate=8000, include=("scores",)) as c:
            assert c.ready["format"] == "mulaw8" and c.ready["resample"] is False
            with pytest.raises(DataFormatError, match="mu-law code bytes"):  # floats are not G.711 codes
                await c.send(np.zeros(4, np.float32))
            for i, (a, b) in enumerate(cuts(len(codes), 6, sizes=(1, 3, 20, 64))):
                await c.send(codes[a:b] if i % 2 else codes[a:b].tobytes())  # uint8 arrays or bytes
            summary = await c.end(timeout=TIMEOUT)
    tokens = mu_law_encode(torch.from_numpy(MULAW8_TO_FLOAT[codes]))
    _, scores = offline_lm(ckpts["mulaw"], tokens, 256)
    np.testing.assert_allclose(c.scores(), scores, atol=OUT_ATOL, rtol=0)
    assert summary["samples"] == len(codes)


# ------------------------------------------------------------------------------ resampling


@pytest.mark.parametrize("in_rate,out_rate,channels", [(44100, 8000, 1), (8000, 16000, 2), (48000, 16000, 1),
                                                       (11025, 8000, 3)])
def test_streaming_resampler_equals_whole_recording_over_random_chunkings(in_rate, out_rate, channels):
    x = tone(in_rate // 2, in_rate, channels)
    whole = resample(x, in_rate, out_rate)
    assert whole.shape == (round(len(x) * out_rate / in_rate), channels)
    for seed in range(4):
        r = StreamResampler(in_rate, out_rate, channels)
        parts = [r(x[a:b]) for a, b in cuts(len(x), seed)] + [r.flush()]
        assert all(p.shape[1] == channels for p in parts)
        np.testing.assert_allclose(np.concatenate(parts), whole, atol=RESAMPLE_ATOL, rtol=0)


async def _stream_audio(url, x: np.ndarray, rate: int, seed: int, **kw) -> tuple[StreamClient, dict]:
    async with StreamClient(url, format="f32le", sample_rate=rate, channels=x.shape[1], **kw) as c:
        for a, b in cuts(len(x), seed):
            await c.send(x[a:b])
        summary = await c.end(timeout=TIMEOUT)
    return c, summary


@pytest.mark.parametrize("workers", [1, 2])
async def test_44k_client_results_equal_offline_forward_of_the_recording_resampled_at_once(ckpts, workers):
    x = tone(44100, 44100)  # 1 s
    async with server(ckpts["float"], workers=workers) as srv:
        c, summary = await _stream_audio(srv.url, x, 44100, seed=7, results="binary")
    ready = c.ready
    assert (ready["sample_rate"], ready["model_sample_rate"], ready["resample"]) == (44100, 8000, True)
    expected = offline_float(ckpts["float"], resample(x, 44100, 8000))
    assert len(expected) == 8000 and summary["samples"] == 8000
    frames = len(cuts(len(x), 7))
    assert [r.seq for r in c.results] == list(range(frames + 1))  # one per frame, one for the flushed tail
    assert any(r.n == 0 for r in c.results)  # frames whose samples the resampler held back
    assert [r.start for r in c.results] == list(np.cumsum([0] + [r.n for r in c.results[:-1]]))
    np.testing.assert_allclose(c.outputs(), expected, atol=OUT_ATOL, rtol=0)


async def test_stereo_is_mixed_down_by_the_mean_then_resampled(ckpts):
    x = tone(8000, 16000, channels=2, seed=3)
    async with server(ckpts["float"]) as srv:
        c, _ = await _stream_audio(srv.url, x, 16000, seed=8)
        same_rate, _ = await _stream_audio(srv.url, x[:3000], 8000, seed=9)
    assert c.ready["downmix"] == "mean" and c.ready["channels"] == 2
    mono = x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(c.outputs(), offline_float(ckpts["float"], resample(mono, 16000, 8000)),
                               atol=OUT_ATOL, rtol=0)
    assert same_rate.ready["resample"] is False
    np.testing.assert_allclose(same_rate.outputs(), offline_float(ckpts["float"], mono[:3000]), atol=OUT_ATOL, rtol=0)


async def test_resampled_streams_are_not_parked(ckpts, tmp_path):
    """The resampler's state is not serializable: its stream's token is lost, said so at once."""
    x = tone(4410, 44100)
    async with server(ckpts["float"], state_dir=str(tmp_path / "state")) as srv:
        async with StreamClient(srv.url, format="f32le", sample_rate=44100, reconnect=0) as c:
            await c.send(x)
            await c._wait_until(lambda: not c._pending)
        assert c.ready["saved_seq"] is None
        start = {"type": "start", "format": "f32le", "sample_rate": 44100, "resume": c.resume_token, "ack": 0}
        code = 1013
        while code == 1013:  # stream_busy until the server has noticed the hang-up: try again
            async with connect(srv.url) as ws:
                await ws.send(json.dumps(start))
                got, code = await read_error(ws)
    assert code == 4410 and got["reason"] == "stream_lost"


# ------------------------------------------------------------------------------ ping, reset


async def test_ping_keeps_a_silent_connection_alive_past_three_idle_timeouts(ckpts):
    idle = 0.4
    async with server(ckpts["dna"], idle_timeout=idle) as srv:
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "start", "format": "text"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for i in range(10):  # 10 x idle/3 > 3 idle timeouts without data
                await ws.send(json.dumps({"type": "ping", "id": f"p{i}"}))
                assert json.loads(await ws.recv()) == {"type": "pong", "id": f"p{i}"}
                await asyncio.sleep(idle / 3)
            await ws.send("ACGT")
            assert json.loads(await ws.recv())["n"] == 4
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv()) == {"type": "pong"}
        async with connect(srv.url) as ws:  # the same silence without pings is cut
            await ws.send(json.dumps({"type": "start", "format": "text"}))
            await ws.recv()
            got, code = await read_error(ws)
    assert code == 1008 and got["reason"] == "idle_timeout"


@pytest.mark.parametrize("workers", [1, 2])
async def test_reset_equals_a_fresh_stream_and_seq_continues(ckpts, workers):
    first, second = "ACGTTGCAAC" * 3, "GGATCCNATT" * 2
    async with server(ckpts["dna"], workers=workers) as srv:
        for results in ("json", "binary"):
            async with StreamClient(srv.url, format="text", results=results) as c:
                for a, b in cuts(len(first), 1, sizes=(1, 4, 9)):
                    await c.send(first[a : b])
                seq = await c.reset()
                for a, b in cuts(len(second), 2, sizes=(1, 4, 9)):
                    await c.send(second[a : b])
                summary = await c.end(timeout=TIMEOUT)
            assert [r.seq for r in c.results] == list(range(len(c.results)))
            marked = [r for r in c.results if r.reset]
            assert [r.seq for r in marked] == [seq] and marked[0].n == 0 and marked[0].start == len(first)
            before = np.concatenate([r.outputs for r in c.results if r.seq < seq])
            after = np.concatenate([r.outputs for r in c.results if r.seq > seq])
            after_scores = np.concatenate([r.scores for r in c.results if r.seq > seq])
            np.testing.assert_allclose(before, offline_lm(ckpts["dna"], encode_bases(first), 5)[0], atol=OUT_ATOL)
            logp, scores = offline_lm(ckpts["dna"], encode_bases(second), 5)  # as a new stream
            np.testing.assert_allclose(after, logp, atol=OUT_ATOL, rtol=0)
            np.testing.assert_allclose(after_scores, scores, atol=OUT_ATOL, rtol=0)
            assert summary["samples"] == len(first) + len(second)


async def test_reset_of_a_resampled_stream_computes_the_held_samples_first(ckpts):
    a, b = tone(8820, 44100, seed=1), tone(6000, 44100, seed=2)
    async with server(ckpts["float"]) as srv:
        async with StreamClient(srv.url, format="f32le", sample_rate=44100) as c:
            for i, j in cuts(len(a), 3):
                await c.send(a[i:j])
            seq = await c.reset()
            for i, j in cuts(len(b), 4):
                await c.send(b[i:j])
            await c.end(timeout=TIMEOUT)
    marked = next(r for r in c.results if r.reset)
    assert marked.seq == seq and marked.n > 0  # the samples the resampler held when the reset came
    before = np.concatenate([r.outputs for r in c.results if r.seq <= seq and r.n])
    after = np.concatenate([r.outputs for r in c.results if r.seq > seq and r.n])
    np.testing.assert_allclose(before, offline_float(ckpts["float"], resample(a, 44100, 8000)), atol=OUT_ATOL, rtol=0)
    np.testing.assert_allclose(after, offline_float(ckpts["float"], resample(b, 44100, 8000)), atol=OUT_ATOL, rtol=0)


async def test_a_reset_stream_resumes_from_a_write_ahead_taken_before_the_reset(ckpts, tmp_path):
    """A crash image holding the pre-reset state: the client resends the reset with its chunks."""
    first, second = "ACGTTGCAACGT" * 2, "TTGACCAGNA" * 2
    live, crash = tmp_path / "live", tmp_path / "crash"
    async with server(ckpts["dna"], state_dir=str(live), write_ahead_interval=600) as srv:
        c = StreamClient(srv.url, format="text", reconnect=8)
        await c.__aenter__()
        for i in range(0, len(first), 6):
            await c.send(first[i : i + 6])
        await c._wait_until(lambda: not c._pending)
        await srv.write_ahead()  # the stream is on disk before the reset
        await c._wait_until(lambda: c._saved_seq == 3)
        shutil.copytree(live, crash)  # what a crash right now would leave
        seq = await c.reset()
        await c.send(second[:7])
        await c._wait_until(lambda: not c._pending)
    async with server(ckpts["dna"], state_dir=str(crash)) as restarted:  # resumes the crash image
        c.url = restarted.url
        await c.send(second[7:])
        await c.end(timeout=TIMEOUT)
        await c.close()
    assert c.reconnects == 1 and seq == 4
    assert [r.seq for r in c.results] == list(range(len(c.results)))
    after = np.concatenate([r.outputs for r in c.results if r.seq > seq])
    np.testing.assert_allclose(after, offline_lm(ckpts["dna"], encode_bases(second), 5)[0], atol=OUT_ATOL, rtol=0)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("messages,code,reason,named", [
    ([{"type": "start", "format": "alaw8", "sample_rate": 8000}], 1003, "bad_format", "alaw8"),
    ([{"type": "start", "format": "f32le", "sample_rate": 999}], 1008, "bad_sample_rate", "999"),
    ([{"type": "start", "format": "f32le", "sample_rate": 8000}, {"type": "ping", "id": [1]}], 1008, "bad_message",
     "ping"),
    ([{"type": "start", "format": "f32le", "sample_rate": 8000}, {"type": "reset", "hard": True}], 1008,
     "bad_message", "hard"),
    ([{"type": "start", "format": "f32le", "sample_rate": 8000}, {"type": "rewind"}], 1008, "bad_message",
     "rewind"),
    ([{"type": "start", "format": "f32le", "sample_rate": 8000}, '{"type": "ping"'], 1007, "bad_json", "JSON"),
    ([{"type": "start", "format": "mulaw8", "sample_rate": 8000, "channels": 2}, b"\x01"], 1007, "partial_sample",
     "mulaw8"),
])
async def test_bad_control_messages_and_formats_get_a_clear_error(ckpts, messages, code, reason, named):
    async with server(ckpts["float"]) as srv:
        async with connect(srv.url) as ws:
            for m in messages:
                await ws.send(m if isinstance(m, (str, bytes)) else json.dumps(m))
            got, closed = await read_error(ws)
    assert closed == code and got["code"] == code and got["reason"] == reason
    assert named in got["message"], got["message"]


# ------------------------------------------------------------------------------ TLS, CLI


def self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1/localhost and its key, made now (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("workers", [1, 2])
async def test_tls_round_trip_with_a_self_signed_certificate(ckpts, tmp_path, workers):
    cert, key = self_signed(tmp_path)
    bases = "ACGTNACGGT" * 4
    async with server(ckpts["dna"], certfile=cert, keyfile=key, workers=workers) as srv:
        assert srv.url.startswith("wss://")
        trusting = ssl.create_default_context(cafile=cert)
        async with StreamClient(srv.url, format="text", ssl=trusting) as c:
            for i in range(0, len(bases), 7):
                await c.send(bases[i : i + 7])
            await c.end(timeout=TIMEOUT)
        with pytest.raises(ConfigError, match="certificate .* is not trusted"):  # the client really verifies it
            async with StreamClient(srv.url, format="text", ssl=ssl.create_default_context(), reconnect=0):
                pass
    np.testing.assert_allclose(c.outputs(), offline_lm(ckpts["dna"], encode_bases(bases), 5)[0], atol=OUT_ATOL)


@pytest.mark.parametrize("where", ["client", "server"])
async def test_stream_cli_sends_a_16k_wav_to_an_8k_model(ckpts, tmp_path, where):
    from streamssm.commands.stream import main as stream_main

    x = tone(16000, 16000, channels=2, seed=4)
    wav, out = tmp_path / "a.wav", tmp_path / "r.npz"
    sf.write(wav, x, 16000, subtype="FLOAT")
    async with server(ckpts["float"]) as srv:
        assert await server_sample_rate(srv.url, format="f32le", sample_rate=16000, channels=2) == 8000
        rc = await asyncio.to_thread(stream_main, [str(wav), "--url", srv.url, "--resample", where, "--out", str(out)])
        async with asyncio.timeout(TIMEOUT):  # the probes of the model's rate leave no stream behind
            while srv.scheduler.live:
                await asyncio.sleep(0.01)
    assert rc == 0
    expected = offline_float(ckpts["float"], resample(x.mean(axis=1, keepdims=True), 16000, 8000))
    # client side: each channel resampled, then mixed down by the server (equal up to rounding)
    np.testing.assert_allclose(np.load(out)["outputs"], expected, atol=1e-4 if where == "client" else OUT_ATOL, rtol=0)
