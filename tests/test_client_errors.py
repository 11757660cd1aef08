"""StreamClient reports the server's own error instead of retrying into a misleading one.

Regression (issue 18): a model call that failed on the server (1011 with an error message)
made the client reconnect and resume, and the user read "resume token is unknown or expired".
"""

import asyncio
import socket

import numpy as np
import pytest
import torch

from streamssm.checkpoint import ServingBundle
from streamssm.errors import ConfigError, ShapeError
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec
from streamssm.service.client import ServerError, ServerUnreachable, StreamClient
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
