"""StreamClient against a real server process killed with SIGKILL mid-stream and restarted on the
same port and state dir: the server says which chunks are saved (``saved``), the client keeps the
later ones and resends them, so its results equal an uninterrupted run; a stream lost before its
first write-ahead (4410) is started again from its first chunk; one lost after the client dropped
saved chunks is a clear error."""

import asyncio
import itertools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from streamssm.service.client import ServerError, StreamClient
from streamssm.service.protocol import STREAM_LOST
from test_service_server import offline_dna

from streamssm.checkpoint import export_safetensors
from streamssm.models import ModelConfig, SSMModel

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    cfg = ModelConfig(block="mamba2", input_kind="tokens", vocab_size=5, head="lm", d_model=16, n_layers=2,
                      d_state=8, headdim=8, chunk_size=4)
    return export_safetensors(SSMModel(cfg).eval(), tmp_path_factory.mktemp("ckpt") / "dna.safetensors",
                              spec={"modality": "dna"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``streamssm serve`` in a subprocess on a fixed port and state dir (the reference model path:
    no Triton interpreter)."""

    def __init__(self, ckpt: Path, port: int, state: Path, write_ahead: float):
        self.cmd = [sys.executable, "-m", "streamssm.cli", "serve", "--checkpoint", str(ckpt), "--port", str(port),
                    "--state-dir", str(state), "--write-ahead-interval", str(write_ahead), "--threads", "1"]
        self.url = f"ws://127.0.0.1:{port}/"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True, env=env)
        lines, deadline = [], time.monotonic() + 60
        for line in self.proc.stderr:
            lines.append(line)
            if re.search(r"listening on ws://", line):
                threading.Thread(target=lambda p=self.proc: [None for _ in p.stderr], daemon=True).start()
                return
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def serve(ckpt, tmp_path):
    servers = []

    def make(write_ahead: float) -> ServerProcess:
        s = ServerProcess(ckpt, free_port(), tmp_path / "state", write_ahead)
        servers.append(s)
        s.start()
        return s

    yield make
    for s in servers:
        s.stop()


def chunks_of(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    text = "".join(rng.choice("ACGTN") for _ in range(n))
    cuts = [0, *sorted(rng.sample(range(1, n), n // 6)), n]
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


async def send_answered(c: StreamClient, chunk: str) -> None:
    """Send one chunk and wait for its result."""
    seq = await c.send(chunk)
    await asyncio.wait_for(c._wait_until(lambda: c._last_seq >= seq), TIMEOUT)


async def wait_saved(c: StreamClient, seq: int) -> None:
    """Wait for the server's ``saved`` notice covering chunk ``seq``."""
    await asyncio.wait_for(c._wait_until(lambda: c._saved_seq >= seq), TIMEOUT)


def assert_uninterrupted(ckpt: Path, c: StreamClient, chunks: list[str]) -> None:
    assert [r.seq for r in c.results] == list(range(len(chunks)))
    logp, scores = offline_dna(ckpt, "".join(chunks))
    np.testing.assert_allclose(c.outputs(), logp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(c.scores(), scores, atol=2e-5, rtol=0)


async def test_sigkill_after_a_write_ahead_resends_the_unsaved_chunks(ckpt, serve):
    chunks = chunks_of(300, 3)
    server = serve(write_ahead=1.0)
    async with StreamClient(server.url, format="text", window=4, reconnect=8) as c:
        assert c.ready["saved_seq"] == -1
        for chunk in chunks[:3]:
            await send_answered(c, chunk)
        await wait_saved(c, 2)  # a write-ahead covers them
        for chunk in chunks[3:6]:  # answered chunks the server has not saved yet
            await send_answered(c, chunk)
        i, held, saved, last = 6, sorted(c._answered), c._saved_seq, c._last_seq
        assert held == list(range(saved + 1, last + 1))  # saved chunks were dropped, later ones kept
        server.kill()
        server.start()  # same port, same state dir
        for chunk in chunks[i:]:
            await c.send(chunk)
        await c.end(timeout=TIMEOUT)
    assert c.reconnects == 1 and c.ready["resumed"]
    assert saved + 1 <= c.ready["next_seq"] <= last  # the server was behind: answered chunks were resent
    assert_uninterrupted(ckpt, c, chunks)


async def test_stream_lost_before_its_first_write_ahead_starts_again_from_chunk_0(ckpt, serve):
    chunks = chunks_of(120, 4)
    server = serve(write_ahead=600.0)
    async with StreamClient(server.url, format="text", window=4, reconnect=8) as c:
        for chunk in chunks[:10]:
            await send_answered(c, chunk)
        assert sorted(c._answered) == list(range(10))  # nothing saved: every chunk kept
        server.kill()
        server.start()
        for chunk in chunks[10:]:
            await c.send(chunk)
        summary = await c.end(timeout=TIMEOUT)
    assert not c.ready["resumed"] and c.ready["next_seq"] == 0  # a new stream, sent again from chunk 0
    assert summary["chunks"] == len(chunks) and summary["samples"] == 120
    assert_uninterrupted(ckpt, c, chunks)


async def test_stream_lost_after_saved_chunks_were_dropped_is_a_clear_error(ckpt, serve, tmp_path):
    chunks = chunks_of(120, 5)
    server = serve(write_ahead=0.3)
    c = StreamClient(server.url, format="text", window=4, reconnect=8)
    await c.__aenter__()
    try:
        for chunk in chunks[:3]:
            await send_answered(c, chunk)
        await wait_saved(c, 2)
        server.kill()
        for f in (tmp_path / "state").glob("*.safetensors"):  # its state is gone
            f.unlink()
        server.start()
        with pytest.raises(ServerError, match="no longer holds its first chunks") as err:
            for chunk in chunks[3:]:
                await c.send(chunk)
            await c.end(timeout=TIMEOUT)
        assert err.value.code == STREAM_LOST
    finally:
        await c.close()
