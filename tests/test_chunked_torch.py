"""The chunked PyTorch paths (backend="torch", the CPU default) against the sequential references.

Outputs, final states and the gradient of every input (initial state included) go through
``(y * dy).sum() + (h * dh).sum()`` so final-state gradients are covered too.
"""

import pytest
import torch

from streamssm.errors import ConfigError
from streamssm.kernels import selective_scan, ssd_scan
from streamssm.kernels._common import choose_backend
from streamssm.kernels.mamba1.chunked_torch import _ChunkedScanFn, selective_scan_chunked
from streamssm.kernels.mamba1.reference import selective_scan_ref
from streamssm.kernels.ssd.chunked_torch import inference_chunk_size, ssd_scan_chunked
from streamssm.kernels.ssd.reference import ssd_scan_ref
from streamssm.testing import assert_close


def _grads_of(fn, inputs: dict[str, torch.Tensor], dy: torch.Tensor, dh: torch.Tensor):
    """Run ``fn(**inputs)`` -> (y, h); return y, h and d/d(input) of (y*dy).sum() + (h*dh).sum()."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = fn(**leaves)
    ((y.float() * dy).sum() + (h * dh).sum()).backward()
    return y.detach(), h.detach(), {k: v.grad for k, v in leaves.items()}


def _compare(name, ref, out):
    y0, h0, g0 = ref
    y1, h1, g1 = out
    assert_close(f"{name} y", y0, y1)
    assert_close(f"{name} final_state", h0, h1)
    for k in g0:
        assert_close(f"{name} d{k}", g0[k], g1[k])


# ----------------------------------------------------------------------------- Mamba-1


def mamba1_inputs(b, d, l, n, g, gen, decay_scale=1.0):
    bc = (b, n, l) if g == 0 else (b, g, n, l)
    return dict(
        u=torch.randn(b, d, l, generator=gen),
        delta=torch.randn(b, d, l, generator=gen) * 0.5 - 1.0,
        A=-torch.rand(d, n, generator=gen) * 4 * decay_scale - 0.1,
        B=torch.randn(*bc, generator=gen),
        C=torch.randn(*bc, generator=gen),
        D=torch.randn(d, generator=gen),
        z=torch.randn(b, d, l, generator=gen),
        delta_bias=torch.randn(d, generator=gen) * 0.1,
        initial_state=torch.randn(b, d, n, generator=gen),
    )


def _mamba1(impl, **kw):
    def fn(**t):
        return impl(**t, delta_softplus=True, return_final_state=True, **kw)
    return fn


@pytest.mark.parametrize(
    "b,d,l,n,g,chunk",
    [(1, 4, 1, 3, 0, 4), (2, 6, 37, 5, 0, 8), (2, 8, 33, 4, 2, 16), (1, 6, 20, 3, 3, 128), (2, 4, 29, 2, 1, 1)],
    ids=lambda v: str(v),
)
def test_selective_scan_chunked_matches_reference(b, d, l, n, g, chunk):
    gen = torch.Generator().manual_seed(b * 100 + l)
    inputs = mamba1_inputs(b, d, l, n, g, gen)
    dy, dh = torch.randn(b, d, l, generator=gen), torch.randn(b, d, n, generator=gen)
    ref = _grads_of(_mamba1(selective_scan_ref), inputs, dy, dh)
    out = _grads_of(_mamba1(selective_scan_chunked, chunk_size=chunk), inputs, dy, dh)
    _compare(f"mamba1 B{b}-D{d}-L{l}-N{n}-G{g}-chunk{chunk}", ref, out)


@pytest.mark.parametrize("decay_scale", [20.0, 200.0])
def test_selective_scan_chunked_strong_decay_cuts_pieces(decay_scale):
    """delta*|A| of hundreds per step: pieces shrink (to single steps at the largest scale) to
    stay finite, and results stay exact."""
    gen = torch.Generator().manual_seed(3)
    inputs = mamba1_inputs(2, 4, 19, 3, 0, gen, decay_scale=decay_scale)
    inputs["delta"] = inputs["delta"] + 3.0  # softplus(delta) ~ 2-3
    dy, dh = torch.randn(2, 4, 19, generator=gen), torch.randn(2, 4, 3, generator=gen)
    ref = _grads_of(_mamba1(selective_scan_ref), inputs, dy, dh)
    out = _grads_of(_mamba1(selective_scan_chunked, chunk_size=16), inputs, dy, dh)
    for t in (out[0], out[1], *out[2].values()):
        assert torch.isfinite(t).all()
    _compare("mamba1 strong decay", ref, out)


@pytest.mark.parametrize("dt_scale", [0.3, 40.0], ids=["whole-pieces", "single-step-pieces"])
def test_selective_scan_chunked_hand_backward_gradcheck(dt_scale):
    """The recurrence's hand-written backward (recomputed pieces, adjoint cumsum) against finite
    differences in float64, over several pieces (chunk 3 of 7 steps) or single-step pieces."""
    gen = torch.Generator().manual_seed(7)
    b, g, e, n, l = 2, 2, 2, 3, 7
    kw = dict(generator=gen, dtype=torch.float64)
    args = (
        torch.rand(b, g, e, l, **kw) * dt_scale + 0.05,  # dt > 0
        torch.randn(b, g, e, l, **kw),  # dt * u
        -torch.rand(g, e, n, 1, **kw) - 0.5,  # A
        torch.randn(b, g, n, l, **kw),  # B
        torch.randn(b, g, n, l, **kw),  # C
        torch.randn(b, g, e, n, **kw),  # h0
    )
    args = tuple(a.requires_grad_(True) for a in args)
    assert torch.autograd.gradcheck(lambda *a: _ChunkedScanFn.apply(*a, 3), args)


def test_selective_scan_chunked_without_options_and_noncontiguous():
    gen = torch.Generator().manual_seed(4)
    b, d, l, n = 2, 5, 23, 4
    u = torch.randn(b, l, d, generator=gen).transpose(1, 2)  # non-contiguous (b, d, l)
    delta = torch.rand(b, l, d, generator=gen).transpose(1, 2)
    A = -torch.rand(d, n, generator=gen)
    B, C = torch.randn(b, n, l, generator=gen), torch.randn(b, n, l, generator=gen)
    assert_close("mamba1 plain", selective_scan_ref(u, delta, A, B, C), selective_scan_chunked(u, delta, A, B, C, chunk_size=8))


def test_selective_scan_chunks_carry_state():
    """Two calls carrying the final state == one call over the whole sequence."""
    gen = torch.Generator().manual_seed(5)
    t = mamba1_inputs(2, 6, 31, 4, 2, gen)
    full, h_full = selective_scan_chunked(**t, delta_softplus=True, return_final_state=True, chunk_size=8)
    first = {k: (v[..., :12] if v.shape[-1] == 31 else v) for k, v in t.items()}
    y1, h1 = selective_scan_chunked(**first, delta_softplus=True, return_final_state=True, chunk_size=8)
    second = {k: (v[..., 12:] if v.shape[-1] == 31 else v) for k, v in t.items()}
    second["initial_state"] = h1
    y2, h2 = selective_scan_chunked(**second, delta_softplus=True, return_final_state=True, chunk_size=8)
    assert_close("mamba1 split output", full, torch.cat([y1, y2], dim=-1))
    assert_close("mamba1 split state", h_full, h2)


def test_selective_scan_bf16_inputs_keep_fp32_state():
    gen = torch.Generator().manual_seed(6)
    t = mamba1_inputs(1, 4, 17, 3, 0, gen)
    low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in t.items()}
    y0, h0 = selective_scan_ref(**low, delta_softplus=True, return_final_state=True)
    y1, h1 = selective_scan_chunked(**low, delta_softplus=True, return_final_state=True, chunk_size=8)
    assert y1.dtype == torch.bfloat16 and h1.dtype == torch.float32
    assert_close("mamba1 bf16 y", y0, y1, dtype=torch.bfloat16)
    assert_close("mamba1 bf16 state", h0, h1)


# ----------------------------------------------------------------------------- Mamba-2 SSD


def ssd_inputs(b, l, h, p, g, n, gen, d_per_headdim=False, rows=None):
    return dict(
        x=torch.randn(b, l, h, p, generator=gen),
        dt=torch.randn(b, l, h, generator=gen) * 0.5 - 1.0,
        A=-torch.rand(h, generator=gen) * 4 - 0.1,
        B=torch.randn(b, l, g, n, generator=gen),
        C=torch.randn(b, l, g, n, generator=gen),
        D=torch.randn(h, p, generator=gen) if d_per_headdim else torch.randn(h, generator=gen),
        z=torch.randn(b, l, h, p, generator=gen),
        dt_bias=torch.randn(h, generator=gen) * 0.1,
        initial_state=torch.randn(rows or b, h, p, n, generator=gen),
    )


def _ssd(impl, chunk, cu_seqlens=None):
    def fn(**t):
        return impl(**t, chunk_size=chunk, dt_softplus=True, cu_seqlens=cu_seqlens, return_final_state=True)
    return fn


@pytest.mark.parametrize(
    "b,l,h,p,g,n,chunk,d_hp",
    [(1, 1, 2, 3, 1, 4, 4, False), (2, 37, 4, 3, 2, 5, 8, True), (2, 30, 4, 2, 1, 3, 64, False),
     (1, 21, 6, 2, 3, 2, 1, False), (2, 16, 2, 4, 2, 3, 16, True)],
    ids=lambda v: str(v),
)
def test_ssd_chunked_matches_reference(b, l, h, p, g, n, chunk, d_hp):
    gen = torch.Generator().manual_seed(b * 100 + l)
    inputs = ssd_inputs(b, l, h, p, g, n, gen, d_hp)
    dy, dh = torch.randn(b, l, h, p, generator=gen), torch.randn(b, h, p, n, generator=gen)
    ref = _grads_of(_ssd(ssd_scan_ref, chunk), inputs, dy, dh)
    out = _grads_of(_ssd(ssd_scan_chunked, chunk), inputs, dy, dh)
    _compare(f"ssd B{b}-L{l}-H{h}-P{p}-G{g}-N{n}-chunk{chunk}", ref, out)


def test_ssd_chunked_cu_seqlens():
    """Packed sequences (one of them empty) restart from their own initial states."""
    gen = torch.Generator().manual_seed(7)
    cu = torch.tensor([0, 5, 5, 19, 30])
    inputs = ssd_inputs(1, 30, 4, 2, 2, 3, gen, rows=4)
    dy, dh = torch.randn(1, 30, 4, 2, generator=gen), torch.randn(4, 4, 2, 3, generator=gen)
    ref = _grads_of(_ssd(ssd_scan_ref, 4, cu), inputs, dy, dh)
    out = _grads_of(_ssd(ssd_scan_chunked, 4, cu), inputs, dy, dh)
    _compare("ssd cu_seqlens", ref, out)
    assert_close("empty sequence keeps its state", inputs["initial_state"][1], out[1][1])


def test_ssd_chunked_block_boundaries(monkeypatch):
    """Several blocks of chunks (tiny block budget) pass the state across blocks."""
    import streamssm.kernels.ssd.chunked_torch as mod

    gen = torch.Generator().manual_seed(8)
    inputs = ssd_inputs(2, 27, 2, 2, 1, 3, gen)
    expected = ssd_scan_ref(**inputs, chunk_size=4, dt_softplus=True, return_final_state=True)
    monkeypatch.setattr(mod, "_BLOCK_ELEMENTS", 1)
    got = ssd_scan_chunked(**inputs, chunk_size=4, dt_softplus=True, return_final_state=True)
    assert_close("ssd blocks y", expected[0], got[0])
    assert_close("ssd blocks state", expected[1], got[1])


def test_ssd_chunks_carry_state():
    gen = torch.Generator().manual_seed(9)
    t = ssd_inputs(2, 29, 4, 2, 2, 3, gen)
    full, s_full = ssd_scan_chunked(**t, chunk_size=8, dt_softplus=True, return_final_state=True)
    timed = ("x", "dt", "B", "C", "z")
    first = {k: (v[:, :13] if k in timed else v) for k, v in t.items()}
    y1, s1 = ssd_scan_chunked(**first, chunk_size=8, dt_softplus=True, return_final_state=True)
    second = {k: (v[:, 13:] if k in timed else v) for k, v in t.items()}
    second["initial_state"] = s1
    y2, s2 = ssd_scan_chunked(**second, chunk_size=8, dt_softplus=True, return_final_state=True)
    assert_close("ssd split output", full, torch.cat([y1, y2], dim=1))
    assert_close("ssd split state", s_full, s2)


def test_inference_chunk_size_follows_the_head_sizes():
    """Small heads get short chunks, large states long ones, within [8, 128]."""
    assert inference_chunk_size(16, 16, 6) == 16  # the demo's audio model (configured 64)
    assert inference_chunk_size(64, 128, 16) == 32  # the 4 x d512 LM (configured 256)
    assert inference_chunk_size(1, 1, 1) == 8
    assert inference_chunk_size(4096, 4096, 1) == 128


def test_torch_backend_chunks_by_head_size_without_gradients(monkeypatch):
    """Without the sequential C scan (no compiler), ssd_scan(backend="torch") runs at
    inference_chunk_size when nothing needs a gradient and at the given chunk_size when something
    does; both match the configured chunk's results."""
    import streamssm.kernels.ssd.chunked_torch as mod
    import streamssm.kernels.ssd.scan_cpu as scan_cpu

    monkeypatch.setattr(scan_cpu, "library", lambda: None)
    used = []
    rows = mod._ssd_rows
    monkeypatch.setattr(mod, "_ssd_rows", lambda *a: used.append(a[6]) or rows(*a))
    gen = torch.Generator().manual_seed(10)
    t = ssd_inputs(2, 45, 4, 16, 1, 16, gen)  # p = n = 16, q = 4: 16-step chunks (3 of them, the last partial)
    expected = ssd_scan_chunked(**t, chunk_size=64, dt_softplus=True, return_final_state=True)
    used.clear()
    with torch.no_grad():
        got = ssd_scan(**t, chunk_size=64, dt_softplus=True, return_final_state=True, backend="torch")
    assert used == [16]
    assert_close("ssd inference chunks y", expected[0], got[0])
    assert_close("ssd inference chunks state", expected[1], got[1])
    leaves = {k: v.clone().requires_grad_(k == "x") for k, v in t.items()}
    ssd_scan(**leaves, chunk_size=64, dt_softplus=True, return_final_state=True, backend="torch")
    assert used == [16, 64]


# ----------------------------------------------------------------------------- dispatch


def test_auto_backend_on_cpu_is_torch():
    assert choose_backend("selective_scan", "auto", torch.device("cpu")) == "torch"
    assert choose_backend("ssd_scan", "torch", torch.device("cpu")) == "torch"
    assert choose_backend("ssd_scan", "reference", torch.device("cpu")) == "reference"
    with pytest.raises(ConfigError, match="'torch'"):
        choose_backend("ssd_scan", "fast", torch.device("cpu"))


def test_auto_backend_is_logged_once_a_device(monkeypatch, caplog):
    """Every command used to log one line per op ("selective_scan: using the torch backend on
    cpu", then ssd_scan, causal_conv1d, ...): four lines of noise for one fact."""
    import streamssm.kernels._common as common

    monkeypatch.setattr(common, "_logged_choices", set())
    with caplog.at_level("INFO", logger=common.log.name):
        for op in ("selective_scan", "ssd_scan", "causal_conv1d", "ssd_scan"):
            choose_backend(op, "auto", torch.device("cpu"))
    said = [r.getMessage() for r in caplog.records]
    assert said == ["kernels: using the torch backend on cpu (first op: selective_scan)"]


def test_public_ops_torch_backend_match_reference_backend():
    gen = torch.Generator().manual_seed(10)
    t = mamba1_inputs(1, 4, 11, 3, 2, gen)
    ref = selective_scan(**t, delta_softplus=True, return_final_state=True, backend="reference")
    auto = selective_scan(**t, delta_softplus=True, return_final_state=True, backend="auto")
    assert_close("selective_scan auto y", ref[0], auto[0])
    assert_close("selective_scan auto state", ref[1], auto[1])
    s = ssd_inputs(1, 11, 2, 2, 1, 3, gen)
    ref = ssd_scan(**s, chunk_size=4, dt_softplus=True, return_final_state=True, backend="reference")
    fast = ssd_scan(**s, chunk_size=4, dt_softplus=True, return_final_state=True, backend="torch")
    assert_close("ssd_scan torch y", ref[0], fast[0])
    assert_close("ssd_scan torch state", ref[1], fast[1])
