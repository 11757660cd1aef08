"""StreamClient reports the server's own error instead of retrying into a misleading one.

Regression (issue 18): a model call that failed on the server (1011 with an error message)
made the client reconnect and resume, and the user read "resume token is unknown or expired".
"""

import asyncio
import json
import socket

import numpy as np
import pytest
import torch
from websockets.asyncio.server import serve

from streamssm.checkpoint import ServingBundle
from streamssm.errors import ConfigError, ProtocolError, ShapeError
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec
from streamssm.service.client import ServerError, ServerTimeout, ServerUnreachable, StreamClient
from streamssm.service.server import ServeConfig, StreamServer

SENSOR = {"modality": "sensor", "channels": ["a", "b"], "mean": [0.0, 0.0], "std": [1.0, 1.0]}


def _bundle() -> ServingBundle:
    cfg = ModelConfig(block="mamba2", input_kind="continuous", input_dim=2, head="regression", output_dim=2,
                      d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4)
    return ServingBundle(SSMModel(cfg).eval(), cfg, ServingSpec.from_dict(SENSOR), "f" * 16)


@pytest.mark.timeout(60)
def test_a_failed_model_call_is_raised_not_retried():
    async def run() -> StreamClient:
        async with StreamServer(_bundle(), ServeConfig(port=0)) as server:
            def broken(outputs: torch.Tensor) -> np.ndarray:
                raise ShapeError("outputs do not fit")

            server.codec.postprocess = broken  # the engine fails on every chunk
            client = StreamClient(server.url, format="f32le", channels=2, reconnect=3)
            with pytest.raises(ServerError) as info:
                async with client:
                    await client.send(np.zeros((8, 2), np.float32))
                    await client.end(timeout=20)
            assert info.value.code == 1011 and "outputs do not fit" in str(info.value)  # the real reason
            return client

    assert asyncio.run(run()).reconnects == 0


def test_no_server_names_the_url_and_how_to_start_one():
    async def run() -> None:
        async with StreamClient("ws://127.0.0.1:9/", format="f32le", channels=2, open_timeout=5):
            pass

    with pytest.raises(ServerUnreachable, match=r"no server at ws://127.0.0.1:9/ .*streamssm serve"):
        asyncio.run(run())


@pytest.mark.timeout(60)
def test_a_client_waits_for_a_server_still_starting():
    """Regression (README walk): `streamssm serve ... &` then `streamssm stream` at once was refused,
    the server not yet listening. A client with ``wait`` retries until it is up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def run() -> dict:
        async def late_server() -> None:
            await asyncio.sleep(0.6)  # several refused tries first
            async with StreamServer(_bundle(), ServeConfig(host="127.0.0.1", port=port)):
                await done.wait()

        done = asyncio.Event()
        server = asyncio.create_task(late_server())
        try:
            async with StreamClient(f"ws://127.0.0.1:{port}/", format="f32le", channels=2, wait=20) as client:
                await client.send(np.zeros((8, 2), np.float32))
                summary = await client.end(timeout=20)
            assert len(client.results) == 1 and client.results[0].outputs.shape == (8, 2)
            return summary
        finally:
            done.set()
            await server

    assert asyncio.run(run())["samples"] == 8


def test_a_negative_wait_is_refused():
    with pytest.raises(ConfigError, match="wait must be >= 0 seconds, got -1"):
        StreamClient("ws://127.0.0.1:9/", format="f32le", wait=-1)


@pytest.mark.timeout(60)
def test_a_missing_token_is_one_clear_error():
    async def run() -> None:
        async with StreamServer(_bundle(), ServeConfig(port=0, token="s3cret")) as server:
            async with StreamClient(server.url, format="f32le", channels=2):
                pass

    with pytest.raises(ConfigError, match="wants a bearer token .*--token or STREAMSSM_TOKEN"):
        asyncio.run(run())


# ------------------------------------------------------------------------------ hostile servers
# A buggy server, or a proxy between, must not make the client hang, loop, keep a message of any
# size or take a wrong result: each case is one clear error (audit of the client side).

READY = {"type": "ready", "version": 1, "resume": "T" * 43, "model": "f" * 16, "head": "regression",
         "output_dim": 2, "next_seq": 0, "samples": 0, "resumed": False, "queue_depth": 8, "saved_seq": None,
         "format": "f32le", "sample_rate": None, "channels": 2, "results": "json",
         "include": ["outputs", "scores"], "model_sample_rate": None, "resample": False, "downmix": None}
GUARD = 10.0  # seconds a case may take; the defects waited forever


def _result(seq: int, start: int, n: int, **fields) -> str:
    return json.dumps({"type": "result", "seq": seq, "start": start, "n": n, "outputs": [[0.5, 0.5]] * n} | fields)


async def _against(handler, body=None, **kw) -> StreamClient:
    """Run ``body(client)`` (default: send three chunks of 4 samples, end) against a fake server."""
    async def default(c: StreamClient) -> None:
        for _ in range(3):
            await c.send(np.zeros((4, 2), np.float32))
        await c.end(timeout=GUARD / 2)

    async with serve(handler, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/"
        client = StreamClient(url, format="f32le", channels=2, open_timeout=2, **({"reconnect": 3} | kw))
        async with asyncio.timeout(GUARD):
            async with client:
                await (body or default)(client)
    return client


def _after_ready(*messages, ready=READY):
    """A server that answers start with ``ready``, the first chunk with ``messages``, then nothing."""
    async def handler(ws) -> None:
        await ws.recv()
        await ws.send(ready if isinstance(ready, str) else json.dumps(ready))
        await ws.recv()
        for m in messages:
            await ws.send(m)
        await ws.wait_closed()  # silent from here on
    return handler


@pytest.mark.parametrize("message,named", [
    ("{nope", "not valid JSON"),
    ("[1]", 'not a JSON object with a string "type"'),
    (json.dumps({"type": "result", "start": 0, "n": 4}), "bad or missing seq=None"),
    (_result("0", 0, 4), "seq='0'"),
    (_result(0, 0, -4), "n=-4"),
    (_result(0, 0, 3, outputs=[[1, 2]] * 4), r"outputs of shape \(4, 2\) for n=3"),
    (_result(0, 0, 2, outputs=[["a", "b"]] * 2), "not arrays of numbers"),
    (_result(0, 0, 4, outputs=[[1, 2, 3]] * 4), "3 outputs per sample, but ready said output_dim 2"),
    (_result(0, 0, 4, scores=[1.0]), r"scores of shape \(1,\) for n=4"),
    (_result(0, 7, 4), "starts at sample 7, but the results before it end at sample 0"),
    (_result(0, 0, 4, reset=True), "marked as a reset's answer, but chunk 0 was data"),
    (_result(1, 0, 4), "result 1 answers a chunk this client never sent"),
    (b"XXXX" + bytes(24), "bad binary result frame.*bad magic"),
    (b"SSR1" + bytes(24) + b"\0", "bad binary result frame.*header says 28"),
    ('{"type": "saved", "seq": 5}', "saved message for chunk 5, but this client holds results only up to -1"),
])
async def test_a_malformed_or_wrong_result_is_a_named_error_not_a_hang(message, named):
    """Regression: a result the client could not decode killed its reader task with a raw
    traceback nobody awaited, and send/end waited forever; a result for a chunk never sent, at the
    wrong offset or of the wrong width was kept as if right."""
    async def body(c: StreamClient) -> None:
        await c.send(np.zeros((4, 2), np.float32))
        await c.end(timeout=GUARD / 2)

    with pytest.raises(ProtocolError, match=named):
        await _against(_after_ready(message), body)


def _summarizing(summary: dict):
    """A server that answers each chunk of 4 samples in order, then ``end`` with ``summary``."""
    async def handler(ws) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        seq = 0
        async for m in ws:
            if isinstance(m, bytes):
                await ws.send(_result(seq, 4 * seq, 4))
                seq += 1
            elif json.loads(m)["type"] == "end":
                await ws.send(json.dumps({"type": "summary"} | summary))
    return handler


@pytest.mark.parametrize("summary,named", [
    ({"chunks": 2, "samples": 8}, "counts 2 chunks and 8 samples, but this client received results for 3 chunks "
                                  "ending at sample 12"),
    ({"chunks": 3, "samples": 13}, "counts 3 chunks and 13 samples"),
    ({"chunks": "3", "samples": 12}, "counts '3' chunks"),
    ({}, "counts None chunks and None samples"),
])
async def test_a_summary_that_disagrees_with_the_results_is_a_named_error(summary, named):
    """Regression: the summary was returned as the server sent it, whatever it counted."""
    with pytest.raises(ProtocolError, match=named) as info:
        await _against(_summarizing(summary))
    assert info.value.reason == "bad_summary"
    client = await _against(_summarizing({"chunks": 3, "samples": 12, "forecast": [0.5, 0.5]}))
    assert len(client.results) == 3


@pytest.mark.parametrize("ready,named", [
    ("{nope", "not valid JSON"),
    (READY | {"next_seq": "0"}, "next_seq='0'"),
    ({k: v for k, v in READY.items() if k != "resume"}, r"resume='\(missing\)'"),
    (READY | {"queue_depth": 0}, "queue_depth=0"),  # a window of 0 waited forever
    (READY | {"model_sample_rate": "fast"}, "model_sample_rate='fast'"),
    (READY | {"next_seq": 5}, "answered a new stream with a resumed one's ready"),  # numbered chunks from 5
])
async def test_a_bad_ready_is_a_named_error(ready, named):
    with pytest.raises(ProtocolError, match=named) as info:
        await _against(_after_ready(ready=ready))
    assert info.value.reason in ("bad_ready", "bad_json")


async def test_an_error_without_fields_still_says_what_came():
    with pytest.raises(ServerError, match="the server sent an error without a message") as info:
        await _against(_after_ready(ready='{"type": "error", "code": "abc"}'))
    assert info.value.code == 1008


async def test_a_server_that_sends_no_ready_times_out_and_is_not_called_absent():
    async def handler(ws) -> None:
        await ws.wait_closed()  # never a ready

    with pytest.raises(ServerTimeout, match="accepted the connection but sent no ready message within 2 s"):
        await _against(handler)


async def test_a_server_that_stops_answering_times_out_in_send_and_end():
    """Regression: send() waited forever for a free window slot (the server still answers pings)."""
    async def fill(c: StreamClient) -> None:
        for _ in range(20):
            await c.send(np.zeros((4, 2), np.float32))

    with pytest.raises(ServerTimeout, match="no result for 0.5 s while 8 chunk"):
        await _against(_after_ready(), fill, timeout=0.5)

    async def never_summarizes(ws) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        async for m in ws:
            if isinstance(m, bytes):
                await ws.send(_result(0, 0, 4))

    async def one(c: StreamClient) -> None:
        await c.send(np.zeros((4, 2), np.float32))
        await c.end(timeout=0.5)

    with pytest.raises(ServerTimeout, match="did not end within 0.5 s: the server sent no summary"):
        await _against(never_summarizes, one)


def _closing(code: int, reason: str = "", after_chunk: bool = False):
    """A server that answers each start with ready (resumed after the first connection), then
    closes with ``code``: after 50 ms, or once the first chunk came (``after_chunk``). Returns
    the handler and a list whose one item counts the connections."""
    connections = [0]

    async def handler(ws) -> None:
        connections[0] += 1
        await ws.recv()
        await ws.send(json.dumps(READY | {"resumed": connections[0] > 1}))
        await (ws.recv() if after_chunk else asyncio.sleep(0.05))
        await ws.close(code, reason)
    return handler, connections


async def test_a_server_that_closes_every_connection_does_not_resume_forever():
    """Regression: each _recover had its own `reconnect` attempts, and a connection that got as far
    as ready counted as resumed: a server closing every one with 1012 was reconnected to forever."""
    handler, connections = _closing(1012)
    with pytest.raises(ProtocolError, match="3 reconnection attempts in a row brought no new result") as info:
        await _against(handler, reconnect=3)
    assert info.value.reason == "resume_failed" and connections == [4]


async def test_a_refusing_close_code_without_a_message_is_raised_not_resumed():
    """Regression: a close with 1008 (or a code the client does not know) and no error message was
    resumed, and the same frames sent again: a loop until end's timeout."""
    handler, connections = _closing(4000, "proxy says no", after_chunk=True)
    with pytest.raises(ServerError, match="closed the connection with code 4000 \\('proxy says no'\\)") as info:
        await _against(handler)
    assert info.value.code == 4000 and connections == [1]


async def test_a_message_over_max_size_is_refused_not_buffered():
    """Regression: the client connected with max_size=None, so a server's 1 GB frame was read whole."""
    big = _result(0, 0, 400)
    with pytest.raises(ProtocolError, match=r"message over max_size \(1000 bytes\).*StreamClient\(max_size=") as info:
        await _against(_after_ready(big), max_size=1000)
    assert info.value.code == 1009
