"""ONNX / torch.export of the recurrent step and of a fixed chunk (streamssm/onnx_export.py):
onnxruntime and the exported programs give the PyTorch outputs and carried state.

Each case exports a tiny model once (module fixture); the chunk length 12 is not a multiple of
the blocks' chunk_size 8, and the step runs 3 streams where the export traced 2 (dynamic batch).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from streamssm.checkpoint import export_safetensors
from streamssm.cli import main as cli_main
from streamssm.errors import ConfigError
from streamssm.models import ModelConfig, SSMModel
from streamssm.onnx_export import METADATA_KEY, export_onnx, flatten_state
from streamssm.serving import ServingSpec

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs error, fp32 (issue 24)
CHUNK, CHUNK_BATCH, STEP_BATCH = 12, 2, 3
_TINY = {"d_model": 16, "n_layers": 2, "d_state": 8, "headdim": 8, "chunk_size": 8, "attention_heads": 2,
         "attention_window": 4}
CASES = {
    "mamba-values": {"block": "mamba", "input_kind": "continuous", "input_dim": 3, "head": "regression", "output_dim": 2},
    "mamba2": {"block": "mamba2", "vocab_size": 5},
    "mamba2-norm-groups": {"block": "mamba2", "vocab_size": 5, "ngroups": 2, "norm_groups": 2},
    "mamba3": {"block": "mamba3", "vocab_size": 5},
    "hybrid-mamba2-attention": {"block": "mamba2", "layer_pattern": "ma", "vocab_size": 5},
}


def _model(case: str) -> SSMModel:
    torch.manual_seed(0)
    return SSMModel(ModelConfig(**_TINY, **CASES[case])).eval()


def _inputs(model: SSMModel, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random model inputs of (batch[, time]) ``shape``."""
    cfg = model.cfg
    if cfg.input_kind == "tokens":
        return torch.randint(0, cfg.vocab_size, shape, generator=gen)
    return torch.randn(*shape, cfg.input_dim, generator=gen)


def _max_err(got: list[np.ndarray], expected: list[torch.Tensor]) -> float:
    assert [a.shape for a in got] == [tuple(t.shape) for t in expected]
    return max(float(np.abs(a - t.numpy()).max()) for a, t in zip(got, expected))


def _stream_error(model: SSMModel, run, ref, shape: tuple[int, ...], calls: int, seed: int) -> float:
    """Worst abs error of ``run(x, flat numpy state) -> [y, *new flat state]`` against ``ref(x,
    state) -> (y, state)`` over ``calls`` random inputs of (batch[, time]) ``shape``, each side
    carrying its own state from zeros."""
    gen = torch.Generator().manual_seed(seed)
    state = model.init_state(shape[0])
    flat = [t.numpy() for t in flatten_state(state)]
    worst = 0.0
    for _ in range(calls):
        x = _inputs(model, shape, gen)
        y, state = ref(x, state)
        y_got, *flat = run(x, flat)
        worst = max(worst, _max_err([y_got, *flat], [y, *flatten_state(state)]))
    return worst


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    model = _model(request.param)
    done = export_onnx(model, tmp_path_factory.mktemp(request.param), chunk_length=CHUNK, chunk_batch=CHUNK_BATCH)
    return model, done, json.loads(done.manifest.read_text())


def _onnx_run(path: Path, manifest: dict):
    """``run(x, flat state)`` of :func:`_stream_error` through onnxruntime."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [s["name"] for s in manifest["state"]]
    return lambda x, flat: sess.run(None, {"x": x.numpy(), **dict(zip(names, flat))})


def _program_run(path: Path):
    """``run(x, flat state)`` of :func:`_stream_error` through a saved torch.export program."""
    module = torch.export.load(path).module()
    return lambda x, flat: [t.numpy() for t in module(x, *map(torch.from_numpy, flat))]


@torch.no_grad()
def test_onnx_step_equals_pytorch_step_over_1000_steps(exported):
    model, done, manifest = exported
    assert _stream_error(model, _onnx_run(done.onnx["step"], manifest), model.step, (STEP_BATCH,), 1000, 1) <= TOL


@torch.no_grad()
def test_onnx_chunk_equals_chunked_forward_carrying_state(exported):
    model, done, manifest = exported
    assert _stream_error(model, _onnx_run(done.onnx["chunk"], manifest), model, (CHUNK_BATCH, CHUNK), 4, 2) <= TOL


@torch.no_grad()
def test_exported_programs_equal_eager(exported):
    model, done, _ = exported
    assert _stream_error(model, _program_run(done.programs["step"]), model.step, (STEP_BATCH,), 50, 3) <= TOL
    assert _stream_error(model, _program_run(done.programs["chunk"]), model, (CHUNK_BATCH, CHUNK), 3, 4) <= TOL


def test_layout_in_onnx_metadata_and_sidecar(exported):
    model, done, manifest = exported
    for kind, path in done.onnx.items():
        proto = onnx.load(str(path), load_external_data=False)
        assert json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY]) == manifest
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        graph = manifest["graphs"][kind]
        assert [(i.name, i.shape) for i in sess.get_inputs()] == [(t["name"], t["shape"]) for t in graph["inputs"]]
        assert [o.name for o in sess.get_outputs()] == [t["name"] for t in graph["outputs"]]
    ref = model.init_state(1)
    assert [(s["shape"][1:], s["dtype"]) for s in manifest["state"]] == [
        (list(t.shape[1:]), str(t.dtype).removeprefix("torch.")) for t in flatten_state(ref)]
    assert manifest["config"] == model.cfg.to_dict()
    assert manifest["layer_kinds"] == list(model.cfg.layer_kinds)


@torch.no_grad()
def test_hybrid_rotary_exact_far_into_a_stream(exported):
    """Regression: the exporter made the 2π of the rotary angle reduction an fp32 constant, so the
    exported attention drifted with the position (1e-2 at position 1e6, 5e-5 after 1000 steps)."""
    model, done, manifest = exported
    if "attention" not in model.cfg.layer_kinds:
        pytest.skip("no attention layer")
    state = list(model.init_state(STEP_BATCH))
    i = model.cfg.layer_kinds.index("attention")
    state[i] = state[i]._replace(conv=torch.tensor([[10**6], [10**6 + 7], [3 * 10**6]]))
    x = _inputs(model, (STEP_BATCH,), torch.Generator().manual_seed(4))
    y, new = model.step(x, tuple(state))
    got = _onnx_run(done.onnx["step"], manifest)(x, [t.numpy() for t in flatten_state(state)])
    assert _max_err(got, [y, *flatten_state(new)]) <= TOL


def test_export_refusals(tmp_path):
    model = _model("mamba2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "step.onnx").write_bytes(b"")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        export_onnx(model, tmp_path / "taken")
    with pytest.raises(ConfigError, match="must be positive"):
        export_onnx(model, tmp_path / "a", chunk_length=0)
    with pytest.raises(ConfigError, match="float32 models only; this one has float16"):
        export_onnx(_model("mamba2").half(), tmp_path / "b")
    with pytest.raises(ConfigError, match="traces the CPU path; this model is on meta"):
        export_onnx(_model("mamba2").to("meta"), tmp_path / "d")
    with pytest.raises(ConfigError, match="encoder gives tokens"):  # a spec that does not fit the model
        export_onnx(_model("mamba-values"), tmp_path / "c", spec=ServingSpec(modality="dna", encoding="bases"))
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_cli_refuses_an_unknown_format(tmp_path, capsys):
    assert cli_main(["export", "--checkpoint", "m.safetensors", "--format", "tflite", "--output", str(tmp_path)]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


_NO_TORCH = ("import importlib.abc, runpy, sys\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'streamssm'):\n"
             "            raise ImportError(f'{name} is blocked in this test')\n"
             "sys.meta_path.insert(0, Block())\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@torch.no_grad()
def test_cli_export_and_the_onnxruntime_example_without_torch(tmp_path, capsys, caplog):
    """``streamssm export --format onnx`` of a DNA model file, then docs/examples/onnx_stream.py
    streams 30 bases (2 chunks + 6 steps) with torch unimportable: the PyTorch forward's outputs.
    The CLI logs at INFO, but the exporter's own INFO lines (onnxscript, onnx_ir: ~180 per
    export) stay off the console."""
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(**_TINY, block="mamba2", vocab_size=5)).eval()
    spec = ServingSpec(modality="dna", encoding="bases")
    export_safetensors(model, tmp_path / "m.safetensors", spec=spec)
    folder = tmp_path / "onnx"
    assert cli_main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "onnx",
                     "--output", str(folder), "--chunk-length", str(CHUNK)]) == 0
    assert f"wrote {folder}" in capsys.readouterr().out
    exporter_lines = [r.name for r in caplog.records if r.name.split(".")[0] in ("onnxscript", "onnx_ir")]
    assert not exporter_lines, exporter_lines[:5]
    manifest = json.loads((folder / "streamssm.json").read_text())
    assert manifest["serving"] == spec.for_model(model.cfg).to_dict()
    assert manifest["graphs"]["chunk"]["batch"] == 1 and manifest["graphs"]["chunk"]["length"] == CHUNK

    tokens = torch.randint(0, 5, (30,), generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "in.npy", tokens.numpy())
    run = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(REPO / "docs/examples/onnx_stream.py"), str(folder),
         str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "30 steps -> outputs (30, 5)" in run.stdout
    expected, _ = model(tokens[None])
    assert np.abs(np.load(tmp_path / "out.npy") - expected[0].numpy()).max() <= TOL
