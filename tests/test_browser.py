"""The browser client: the page and files ``streamssm serve`` answers over plain HTTP, token auth
through the websocket subprotocol (browsers cannot set headers), and a real browser: headless
Chromium (driven over the DevTools protocol with the ``websockets`` package) opens the page and
streams its fake microphone (a WAV made here), an audio clip, a sensor CSV (over http and https)
or a FASTA; every result the page received must equal the offline forward of what it sent (audio:
resampled at once from the browser's rate to the model's), and a paused stream must outlive
three idle timeouts on the page's pings. Skipped without Chromium (Debian: ``apt-get install
chromium``; .ci/run installs it). Screenshots go to the test's tmp dir (docs/browser_client.png
is one of the microphone test's).
"""

import asyncio
import base64
import contextlib
import json
import math
import shutil
import urllib.error
import urllib.request
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamssm.checkpoint import export_safetensors, load_for_serving
from streamssm.models import ModelConfig, SSMModel
from streamssm.service import static
from streamssm.service.resample import resample
from streamssm.service.server import ServeConfig, StreamServer
from test_service_realclients import self_signed
from test_service_server import offline_dna, random_bases

pytestmark = pytest.mark.timeout(300)

TOKEN = "s3cret token/é"  # not base64url-safe as is: the page must encode it
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
TONE_HZ = 330.0
SECONDS = 0.5  # the page stops after this much audio (Chromium's fake microphone loops its file)
MODEL_RATE = 16000  # the browser's own rate (44.1 or 48 kHz) differs: the server resamples
PAGE_TIMEOUT = 150  # s for a stream to finish (a busy 2-core CI machine computes slowly)


def export_audio_lm(tmp, sample_rate: int):
    """A tiny mu-law audio LM (random weights) with its serving spec."""
    torch.manual_seed(7)
    cfg = ModelConfig(block="mamba", input_kind="tokens", vocab_size=256, head="lm", d_model=16, n_layers=2,
                      d_state=8, headdim=8, chunk_size=4)
    spec = {"modality": "audio", "sample_rate": sample_rate, "encoding": "mu_law"}
    return export_safetensors(SSMModel(cfg).eval(), tmp / "audio_lm.safetensors", spec=spec)


def offline_scores(path, samples: np.ndarray) -> np.ndarray:
    """log p(x_t | x_<t) of every sample from the offline full forward (the first under a uniform prior)."""
    bundle = load_for_serving(path)
    tokens = bundle.spec.encoder()(torch.from_numpy(samples.copy()))
    with torch.no_grad():
        logp = F.log_softmax(bundle.model(tokens.unsqueeze(0))[0][0].float(), -1)
    prev = torch.cat([torch.full((1, 256), -math.log(256)), logp[:-1]])
    return prev.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).numpy()


def write_tone(path, rate: int = 48000, seconds: float = 3.0) -> None:
    """A 16-bit mono WAV: a TONE_HZ sine with a little noise."""
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * TONE_HZ * t) + 0.01 * np.random.default_rng(0).normal(size=t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())


def dominant_hz(x: np.ndarray, rate: float) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[np.argmax(spectrum)])


def http_get(url: str, headers: dict | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


# ------------------------------------------------------------------------ HTTP and auth, no browser


@pytest.fixture(scope="module")
def lm_8k(tmp_path_factory):
    return export_audio_lm(tmp_path_factory.mktemp("browser"), 8000)


async def test_page_and_files_are_served_without_token(lm_8k):
    async with StreamServer(load_for_serving(lm_8k), ServeConfig(port=0, token=TOKEN, ping_interval=None)) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        for path in ("/", "/ui", "/ui/", "/ui/?x=1"):
            status, ctype, body = await asyncio.to_thread(http_get, base + path)
            assert status == 200 and ctype == "text/html; charset=utf-8" and '<script type="module"' in body, path
        for name, ctype in static.UI_FILES.items():
            status, got, body = await asyncio.to_thread(http_get, f"{base}/ui/{name}")
            assert (status, got) == (200, ctype) and body, name
        for path in ("/ui/../server.py", "/ui/nope.js", "/ui/ui/app.js"):  # no other file is readable
            assert (await asyncio.to_thread(http_get, base + path))[0] in (401, 404), path


async def test_model_json_needs_the_token(lm_8k):
    async with StreamServer(load_for_serving(lm_8k), ServeConfig(port=0, token=TOKEN, ping_interval=None)) as srv:
        url = f"http://127.0.0.1:{srv.port}{static.MODEL_PATH}"
        assert (await asyncio.to_thread(http_get, url))[0] == 401
        status, ctype, body = await asyncio.to_thread(http_get, url, {"Authorization": f"Bearer {TOKEN}"})
    info = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert (info["modality"], info["head"], info["sample_rate"], info["output_dim"]) == ("audio", "lm", 8000, 256)
    assert info["formats"][:2] == ["f32le", "s16le"] and info["output_names"][:2] == ["0", "1"]


def bearer_subprotocol(token: str) -> str:
    return static.BEARER_PREFIX + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def test_token_as_subprotocol_authorizes_a_websocket(lm_8k):
    async with StreamServer(load_for_serving(lm_8k), ServeConfig(port=0, token=TOKEN, ping_interval=None)) as srv:
        start = json.dumps({"type": "start", "format": "f32le", "sample_rate": 8000, "include": ["scores"]})
        async with connect(srv.url, subprotocols=[static.SUBPROTOCOL, bearer_subprotocol(TOKEN)]) as ws:
            assert ws.subprotocol == static.SUBPROTOCOL  # never the token
            await ws.send(start)
            assert json.loads(await ws.recv())["type"] == "ready"
        for offered in ([static.SUBPROTOCOL, bearer_subprotocol("wrong")], [static.SUBPROTOCOL, "bearer.%%%"],
                        [static.SUBPROTOCOL], [bearer_subprotocol(TOKEN), bearer_subprotocol("other")]):
            with pytest.raises(InvalidStatus) as err:
                async with connect(srv.url, subprotocols=offered):
                    pass
            assert err.value.response.status_code == 401, offered


# ---------------------------------------------------------------------------------- a real browser


class DevTools:
    """A minimal Chrome DevTools Protocol client (one page target) over ``websockets``."""

    def __init__(self, ws):
        self.ws = ws
        self.last_id = 0

    async def call(self, method: str, **params):
        self.last_id += 1
        await self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events interleave with answers; this client waits for its answer only
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.last_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str):
        """The value of a JS expression (promises awaited), as a user gesture (audio may start)."""
        got = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                              userGesture=True)
        if "exceptionDetails" in got:
            raise AssertionError(f"{expression!r} threw: {got['exceptionDetails']}")
        return got["result"].get("value")

    async def wait_for(self, expression: str, timeout: float):
        """Poll until the expression is truthy; returns its value."""
        async with asyncio.timeout(timeout):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.2)
        return value


@contextlib.asynccontextmanager
async def chromium(tmp_path, fake_audio):
    """Headless Chromium (with a fake microphone playing ``fake_audio``, if given); yields a DevTools
    client of its page."""
    mic = [] if fake_audio is None else ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                         f"--use-file-for-fake-audio-capture={fake_audio}"]
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
        "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}", *mic,
        "--ignore-certificate-errors",  # the https test's certificate is self-signed, made at test time
        "--autoplay-policy=no-user-gesture-required", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        log = []
        async with asyncio.timeout(60):
            while b"DevTools listening on" not in (line := await proc.stderr.readline()):
                if not line:  # a broken install (e.g. a snap shim without snapd) is not this code's failure
                    pytest.skip(f"{CHROMIUM} exited before its DevTools endpoint came up: {b''.join(log[-5:])!r}")
                log.append(line)
        port = int(line.decode().strip().rsplit(":", 1)[1].split("/", 1)[0])
        targets = json.loads((await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/json/list"))[2])
        page = next(t for t in targets if t["type"] == "page")
        asyncio.create_task(_drain(proc.stderr))
        async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            devtools = DevTools(ws)
            await devtools.call("Emulation.setDeviceMetricsOverride", width=1000, height=620, deviceScaleFactor=1,
                                mobile=False)
            yield devtools
    finally:
        proc.terminate()
        await proc.wait()


async def _drain(stream) -> None:
    while await stream.readline():  # keep Chromium's log pipe from filling up
        pass


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                                   "chromium); the real-browser tests need it (.ci/run installs it)")


async def open_page(page: DevTools, port: int, seconds: str = "", upload=None, scheme: str = "http") -> None:
    """Open the page; fill in the token, the stop-after seconds and the file to upload."""
    await page.call("Page.navigate", url=f"{scheme}://127.0.0.1:{port}/ui")
    await page.wait_for("document.readyState === 'complete' && window.streamssm?.status === 'idle'", 30)
    if upload is not None:
        root = (await page.call("DOM.getDocument"))["root"]["nodeId"]
        node = (await page.call("DOM.querySelector", nodeId=root, selector="#file"))["nodeId"]
        await page.call("DOM.setFileInputFiles", files=[str(upload)], nodeId=node)
    await page.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                        f"document.getElementById('seconds').value = {json.dumps(seconds)}")


async def finished(page: DevTools) -> dict:
    """Wait until the page's stream is done; its dump(), checked for results in order, every sample once."""
    try:
        await page.wait_for("['done', 'error'].includes(window.streamssm.status)", PAGE_TIMEOUT)
    except TimeoutError:
        state = await page.evaluate("[window.streamssm.status, document.getElementById('status').textContent]")
        raise AssertionError(f"the page did not finish in {PAGE_TIMEOUT} s: {state}") from None
    got = await page.evaluate("window.streamssm.dump()")
    assert got["status"] == "done", got["error"]
    assert got["seqs"] == list(range(len(got["seqs"])))  # results in order
    assert got["starts"] == [sum(got["ns"][:i]) for i in range(len(got["ns"]))]  # every sample once
    return got


async def run_page(page: DevTools, port: int, button: str, seconds: str = "", upload=None,
                   scheme: str = "http") -> tuple[dict, bytes]:
    """Open the page, press ``button``, wait until the stream is done; its dump() and a screenshot."""
    await open_page(page, port, seconds, upload, scheme)
    await page.evaluate(f"document.getElementById({json.dumps(button)}).click()")
    got = await finished(page)
    shot = await page.call("Page.captureScreenshot", format="png")
    return got, base64.b64decode(shot["data"])


@needs_chromium
async def test_browser_microphone_results_equal_offline_forward(tmp_path):
    fake_audio = tmp_path / "tone.wav"
    write_tone(fake_audio)
    ckpt = export_audio_lm(tmp_path, MODEL_RATE)
    cfg = ServeConfig(port=0, token=TOKEN, ping_interval=None)
    async with chromium(tmp_path, fake_audio) as page, StreamServer(load_for_serving(ckpt), cfg) as srv:
        got, png = await run_page(page, srv.port, "mic", str(SECONDS))
    (tmp_path / "browser.png").write_bytes(png)
    assert len(floats(got["sent"])) == round(SECONDS * got["rate"])
    assert_lm_results(ckpt, got)


def assert_lm_results(ckpt, got: dict) -> None:
    """The page's LM scores equal the offline forward of what it sent, resampled at once."""
    rate = got["rate"]
    sent = floats(got["sent"])
    assert rate != MODEL_RATE and got["ready"]["sample_rate"] == rate and len(sent) == sum(got["chunks"])
    assert abs(dominant_hz(sent, rate) - TONE_HZ) < 5  # the fake microphone's file, not silence
    expected = offline_scores(ckpt, resample(sent[:, None], rate, MODEL_RATE)[:, 0])  # the whole recording at once
    assert len(got["seqs"]) == len(got["chunks"]) + 1  # one result per frame, one for the resampler's flushed tail
    scores = floats(got["scores"])
    assert got["summary"]["samples"] == len(scores) == len(expected)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


@needs_chromium
async def test_browser_paused_stream_pings_past_three_idle_timeouts(tmp_path):
    fake_audio = tmp_path / "tone.wav"
    write_tone(fake_audio)
    ckpt = export_audio_lm(tmp_path, MODEL_RATE)
    idle = 1.5
    cfg = ServeConfig(port=0, token=TOKEN, ping_interval=None, idle_timeout=idle)
    async with chromium(tmp_path, fake_audio) as page, StreamServer(load_for_serving(ckpt), cfg) as srv:
        await open_page(page, srv.port)
        await page.evaluate("document.getElementById('mic').click()")
        await page.wait_for("window.streamssm.results.length > 2", PAGE_TIMEOUT)
        await page.evaluate("document.getElementById('pause').click()")
        await page.wait_for("window.streamssm.status === 'paused'", 10)
        await page.wait_for("window.streamssm.stream.answered === window.streamssm.stream.sent", PAGE_TIMEOUT)
        await asyncio.sleep(3.5 * idle)  # nothing owed, nothing sent but the page's pings
        assert await page.evaluate("[window.streamssm.status, window.streamssm.pongs >= 3]") == ["paused", True]
        await page.evaluate("document.getElementById('pause').click()")
        sent = await page.evaluate("window.streamssm.sent.length")
        await page.wait_for(f"window.streamssm.sent.length > {sent} + 2", 30)  # streaming again
        await page.evaluate("document.getElementById('stop').click()")
        got = await finished(page)
    assert got["pongs"] >= 3
    assert_lm_results(ckpt, got)  # paused audio is dropped: what was sent, gap and all, is answered


@needs_chromium
@pytest.mark.parametrize(("scheme", "head"), [("http", "classifier"), ("https", "regression")])
async def test_browser_sensor_csv_upload(tmp_path, scheme, head):
    torch.manual_seed(3)
    cfg = ModelConfig(block="mamba", input_kind="continuous", input_dim=3, head=head, output_dim=3, d_model=16,
                      n_layers=2, d_state=8, headdim=8, chunk_size=4)
    spec = {"modality": "sensor", "channels": ["a", "b", "c"], "mean": [1.0, -2.0, 0.5], "std": [2.0, 0.5, 3.0],
            "classes": ["rest", "walk", "run"] if head == "classifier" else []}
    ckpt = export_safetensors(SSMModel(cfg).eval(), tmp_path / f"{head}.safetensors", spec=spec)
    values = (np.random.default_rng(4).normal(size=(300, 3)) * 2 + 1).astype(np.float32)
    csv = tmp_path / "series.csv"
    csv.write_text("a,b,c\n" + "".join(",".join(f"{v:.9g}" for v in row) + "\n" for row in values))
    tls = dict(zip(("certfile", "keyfile"), self_signed(tmp_path))) if scheme == "https" else {}
    cfg = ServeConfig(port=0, token=TOKEN, ping_interval=None, **tls)
    async with chromium(tmp_path, None) as page, StreamServer(load_for_serving(ckpt), cfg) as srv:
        got, png = await run_page(page, srv.port, "play", upload=csv, scheme=scheme)
        label = await page.evaluate("document.getElementById('label').textContent")
        ws_url, port = await page.evaluate("window.streamssm.stream.ws.url"), srv.port
    assert ws_url == f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/stream"  # wss for a page loaded over https
    (tmp_path / f"browser_{head}.png").write_bytes(png)
    np.testing.assert_array_equal(floats(got["sent"]).reshape(-1, 3), values)  # the CSV, exactly
    assert len(got["seqs"]) == len(got["chunks"])
    bundle = load_for_serving(ckpt)
    with torch.no_grad():
        y, _ = bundle.model(bundle.spec.encoder()(torch.from_numpy(values)).unsqueeze(0))
    if head == "classifier":
        expected = F.softmax(y[0].float(), -1).numpy()
        assert label.startswith(f"label: {spec['classes'][int(expected[-1].argmax())]} ")
    else:
        expected = bundle.spec.output_decoder()(y[0].float()).numpy()  # forecasts in raw units
    np.testing.assert_allclose(floats(got["outputs"]).reshape(-1, 3), expected, rtol=1e-5, atol=1e-5)


@needs_chromium
async def test_browser_audio_file_upload_equals_offline_forward(tmp_path):
    clip = tmp_path / "clip.wav"
    write_tone(clip, rate=22050, seconds=0.5)  # decoded to the browser's rate, played and streamed through the worklet
    ckpt = export_audio_lm(tmp_path, MODEL_RATE)
    cfg = ServeConfig(port=0, token=TOKEN, ping_interval=None)
    async with chromium(tmp_path, None) as page, StreamServer(load_for_serving(ckpt), cfg) as srv:
        got, _ = await run_page(page, srv.port, "play", upload=clip)
    assert len(floats(got["sent"])) == round(0.5 * got["rate"])  # the whole clip: no sample lost, no padding
    assert_lm_results(ckpt, got)


@needs_chromium
async def test_browser_fasta_upload_to_a_dna_model(tmp_path):
    torch.manual_seed(5)
    cfg = ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", d_model=16, n_layers=2, d_state=8,
                      headdim=8, chunk_size=4)
    ckpt = export_safetensors(SSMModel(cfg).eval(), tmp_path / "dna.safetensors", spec={"modality": "dna"})
    bases = random_bases(700, seed=6)
    fasta = tmp_path / "seq.fa"
    fasta.write_text(">chr_test\n" + "\n".join(bases[i:i + 60] for i in range(0, len(bases), 60)) + "\n")
    serve_cfg = ServeConfig(port=0, token=TOKEN, ping_interval=None)
    async with chromium(tmp_path, None) as page, StreamServer(load_for_serving(ckpt), serve_cfg) as srv:
        got, _ = await run_page(page, srv.port, "play", upload=fasta)
    assert got["sent"] == bases and got["ns"] == [256, 256, 188]
    np.testing.assert_allclose(floats(got["scores"]), offline_dna(ckpt, bases)[1], rtol=1e-5, atol=2e-5)
