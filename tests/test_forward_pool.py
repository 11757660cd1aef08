"""Backbone.forward_pool (the Streamer's chunked call): the forward from and back into pool rows.

Every block kind must equal ``forward`` from the gathered rows, write the new states into those
rows and leave the other rows bit for bit; Mamba-2 on the Triton backend reads and writes its
SSM rows inside the one-pass kernel (interpreter on CPU), the rest gather and scatter.
"""

from __future__ import annotations

import pytest
import torch

import streamssm.kernels as kernels
import streamssm.kernels.library as lib
from streamssm.errors import ShapeError, StateError
from streamssm.models import ModelConfig, SSMModel
from streamssm.state import select_streams
from streamssm.testing import assert_close

MODELS = {
    "mamba": dict(block="mamba"),
    "mamba2": dict(block="mamba2"),
    "mamba3": dict(block="mamba3"),
    "hybrid": dict(block="mamba2", layer_pattern="am", attention_heads=2, attention_window=8),
}
ROWS = torch.tensor([4, 1, 2])  # 3 streams in a 6-row pool; rows 0, 3 and 5 idle


def _model_and_pool(name: str):
    """A tiny model and a pool whose rows hold the states after 11 random steps."""
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8, vocab_size=5,
                                 **MODELS[name])).eval()
    with torch.no_grad():
        _, pool = model.backbone(torch.randn(6, 11, 16))
    return model, pool


def _check(model, pool, x):
    with torch.no_grad():
        want, want_state = model.backbone(x, select_streams(pool, ROWS))
        got_pool = tuple(type(layer)(*(t.clone() for t in layer)) for layer in pool)
        got = model.backbone.forward_pool(x, got_pool, ROWS)
    assert_close("features", want, got, torch.float32)
    idle = torch.tensor([0, 3, 5])
    for i, (layer, new, old) in enumerate(zip(got_pool, want_state, pool)):
        for field, t, w, o in zip(new._fields, layer, new, old):
            assert_close(f"layer {i} {field} rows", w, t[ROWS], torch.float32)
            assert torch.equal(t[idle], o[idle]), f"layer {i} {field}: an idle row changed"


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_pool_equals_forward_from_gathered_rows(name):
    model, pool = _model_and_pool(name)
    _check(model, pool, torch.randn(3, 13, 16))


@pytest.mark.parametrize("length", [13, 1])
def test_mamba2_forward_pool_through_triton_reads_rows_in_the_kernel(length, monkeypatch):
    """Triton backend (the GPU's): the one-pass kernel reads and writes the SSM rows itself."""
    model, pool = _model_and_pool("mamba2")
    resolve = kernels.choose_backend
    monkeypatch.setattr(kernels, "choose_backend", lambda op, b, device: resolve(op, "triton", device))
    calls = []
    real = lib.ssd_scan_infer_pool
    monkeypatch.setattr(lib, "ssd_scan_infer_pool", lambda *a: calls.append(a) or real(*a))
    _check(model, pool, torch.randn(3, length, 16))
    assert len(calls) == len(model.backbone.layers)


def test_forward_pool_bad_input_is_named():
    model, pool = _model_and_pool("mamba2")
    with pytest.raises(ShapeError, match="forward_pool"):
        model.backbone.forward_pool(torch.randn(3, 0, 16), pool, ROWS)
    with pytest.raises(StateError, match="1 layers"):
        model.backbone.forward_pool(torch.randn(3, 4, 16), pool[:1], ROWS)
