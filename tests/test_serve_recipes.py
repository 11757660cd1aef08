"""Every tiny recipe (and the head/modality/option variants the tasks can produce) trains, exports,
serves through the real websocket server and streams its own held-out data with the README's
client; the streamed outputs equal the offline forward in the units a user sees.

Regression (issue 18): a sensor_tiny model (horizon 4 x 4 channels) could not be streamed, and
the README's StreamClient example worked only with one model. Training is a few steps: the
test checks the serving contract, not learning (tests/test_recipes.py checks that).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from streamssm.checkpoint import load_for_serving
from streamssm.commands.export import main as export_main
from streamssm.commands.fit import build_cli
from streamssm.commands.make_data import make_data
from streamssm.encoding import Normalizer, mu_law_decode
from streamssm.inference import head_output
from streamssm.service.client import StreamClient, model_settings
from streamssm.service.config import ServeConfig
from streamssm.service.server import StreamServer
from streamssm.service.sources import read_source

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
HELD_OUT = 300  # steps streamed per model
CHUNK = 64
FAST = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@dataclass(frozen=True)
class Case:
    recipe: str
    data: str  # make-data kind
    overrides: tuple[str, ...] = ()


CASES = {
    "dna_tiny": Case("dna_tiny", "dna", ("--data.init_args.window", "64")),
    "dna_hybrid_tiny": Case("dna_hybrid_tiny", "dna", ("--data.init_args.window", "64")),
    "dna_mamba3_tiny": Case("dna_mamba3_tiny", "dna", ("--data.init_args.window", "64")),
    "waveform_tiny": Case("waveform_tiny", "waveform", ("--data.init_args.crop", "64")),
    "sensor_tiny": Case("sensor_tiny", "sensor", ("--data.init_args.window", "64")),
    # the other heads and options the tasks and datamodules produce
    "sensor_targets": Case("sensor_tiny", "sensor", ("--data.init_args.window", "64",
                                                     "--data.init_args.target_columns", "[ch3, ch1]")),
    "sensor_classify_tiny": Case("sensor_classify_tiny", "sensor", ("--data.init_args.window", "64")),
    "sensor_forecast_tiny": Case("sensor_forecast_tiny", "sensor", ("--data.init_args.window", "64")),
    "dna_classify_tiny": Case("dna_classify_tiny", "dna_labels"),
    "waveform_float_horizon": Case("waveform_tiny", "waveform", ("--model", "streamssm.tasks.Forecaster",
                                                                 "--model.init_args.horizon", "3",
                                                                 "--data.init_args.encoding", "float",
                                                                 "--data.init_args.crop", "64")),
}


def test_every_tiny_recipe_is_covered():
    tiny = {p.stem for p in RECIPES.glob("*_tiny.yaml")}
    assert tiny == {c.recipe for c in CASES.values()}


@dataclass
class Trained:
    model: Path  # the .safetensors export
    held_out: np.ndarray | str  # raw held-out data: (l, c) float32 or a str of bases
    normalizer: Normalizer | None  # the forecast channels' statistics (sensor forecasters)


def _held_out(fit) -> tuple[np.ndarray | str, Normalizer | None]:
    """Raw data of the validation/test split the model did not train on, read from the files."""
    dm = fit.datamodule
    name = type(dm).__name__
    if name == "FastaDataModule":
        region = dm.split_regions["val"][0]
        bases = read_source(dm.files[region.file], record=region.chrom).data
        return bases[region.start:region.start + HELD_OUT], None
    if name == "DnaLabelsDataModule":  # one whole held-out record
        item = dm.split_items["test"][0]
        return read_source(dm.files[item.file], record=item.chrom).data[item.start:item.end], None
    if name == "WaveformDataModule":  # a mu-law datamodule holds tokens: back to audio (the service
        file, lo, _ = dm.split_ranges["val"][0]  # refuses float audio at token scale, 0..255)
        held = dm.audio[file][lo:lo + HELD_OUT]
        if dm.encoding == "mu_law":
            held = mu_law_decode(torch.from_numpy(held.astype(np.int64)), dm.quantization_channels).numpy()
        return np.asarray(held, np.float32), None
    s, _ = dm.split_rows["test"][0]
    raw = read_source(dm.path, columns=list(dm.feature_names)).data[s:s + HELD_OUT]
    idx = dm.target_index or list(range(len(dm.feature_names)))
    norm = None if dm.task == "classification" else Normalizer(dm.normalizer.mean[idx], dm.normalizer.std[idx])
    return raw, norm


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Trained]:
    """Train (2 steps) and export every case once, in a scratch folder (recipes use runs/...)."""
    import os

    work = tmp_path_factory.mktemp("recipes")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for kind in {c.data for c in CASES.values()}:
            make_data(kind)
        out = {}
        for name, case in CASES.items():
            fit = build_cli("fit", ["--config", str(RECIPES / f"{case.recipe}.yaml"), *case.overrides, *FAST,
                                    "--trainer.logger.init_args.name", name])
            ckpt = fit.trainer.checkpoint_callback.last_model_path
            export = work / f"{name}.safetensors"
            assert export_main(["--checkpoint", ckpt, "--output", str(export)]) == 0
            held, norm = _held_out(fit)
            out[name] = Trained(export, held, norm)
        return out
    finally:
        os.chdir(cwd)


def offline(t: Trained) -> tuple[np.ndarray, np.ndarray | None]:
    """One forward over the whole held-out signal, in the units the service sends.

    Returns outputs (l, o) and, for language models, log p(x_t | x_<t) per step."""
    bundle = load_for_serving(t.model)
    x = bundle.spec.encoder()(t.held_out)
    with torch.no_grad():
        y = head_output(bundle.config.head, bundle.model(x[None])[0][0].float())  # (l, o)
    scores = None
    if bundle.config.head == "lm":
        prior = torch.full((1, y.shape[1]), -float(np.log(y.shape[1])))
        scores = torch.cat([prior, y[:-1]]).gather(1, x.long()[:, None])[:, 0].numpy()
    if t.normalizer is not None:  # a forecaster: (l, h * k) -> per horizon step and channel in raw units
        k = t.normalizer.channels
        y = t.normalizer.invert(y.view(y.shape[0], -1, k)).reshape(y.shape)
    return y.numpy(), scores


async def _serve_and_stream(model: Path, held: np.ndarray | str):
    async with StreamServer(load_for_serving(model), ServeConfig(port=0, max_streams=2)) as server:
        async with StreamClient(server.url, **model_settings(model)) as client:
            for start in range(0, len(held), CHUNK):
                await client.send(held[start:start + CHUNK])
            summary = await client.end()
            return client.outputs(), client.scores(), summary


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(CASES))
def test_trained_model_streams_like_its_offline_forward(name, trained):
    t = trained[name]
    outputs, scores, summary = asyncio.run(_serve_and_stream(t.model, t.held_out))
    expected, expected_scores = offline(t)
    assert summary["samples"] == len(t.held_out)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    if expected_scores is not None:
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)


def _readme_client_example() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"From Python:\n\n```python\n(.*?)```", readme, re.S)
    assert block, "README lost its Python StreamClient example"
    return block.group(1)


@contextlib.contextmanager
def served(model: Path):
    """A real server for ``model`` on a free loopback port, in its own thread and event loop."""
    started, stop = threading.Event(), threading.Event()
    box: dict = {}

    async def main() -> None:
        async with StreamServer(load_for_serving(model), ServeConfig(port=0, max_streams=2)) as server:
            box["url"] = server.url
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=lambda: box.setdefault("error", asyncio.run(main())), daemon=True)
    thread.start()
    try:
        assert started.wait(30), "server did not start"
        yield box["url"]
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["dna_tiny", "waveform_tiny", "sensor_tiny"])
def test_readme_client_example_streams_every_tour_model(name, trained):
    """The README's example, run verbatim (its url and model path filled in) against a server
    for each model the Tour trains; its stream() also gives the offline outputs on held-out data."""
    t = trained[name]
    with served(t.model) as url:
        code = _readme_client_example().replace("ws://127.0.0.1:8765/", url)
        scope: dict = {}
        exec(compile(code.replace('"model.safetensors"', repr(str(t.model))), "README.md", "exec"), scope)
        assert scope["outputs"].shape[0] == len(scope["signal"])
        outputs = asyncio.run(scope["stream"](t.held_out))
    np.testing.assert_allclose(outputs, offline(t)[0], rtol=1e-4, atol=1e-4)
