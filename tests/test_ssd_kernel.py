"""Triton SSD (Mamba-2) chunked scan vs the sequential reference (CPU: TRITON_INTERPRET=1, fp32).

Gradients are checked by backpropagating ``(y * dy).sum() + (hT * dhT).sum()``, so the final
state's gradient path (and through it the initial state's) is covered. GPU tests (bf16/fp32,
realistic sizes) compare against the chunked reference in float64.
"""

from __future__ import annotations

import pytest
import torch

from streamssm.errors import ShapeError
from streamssm.kernels import ssd_scan, ssd_scan_pool
from streamssm.kernels.ssd import combined
from streamssm.kernels.ssd.bmm_chunk import _chunk_cb_fwd, chunk_cb_ref
from streamssm.kernels.ssd.chunks import chunk_layout
from streamssm.kernels.ssd.chunked_torch import ssd_scan_chunked
from streamssm.kernels.ssd.fused_fwd import ssd_fused_fwd, use_fused_forward
from streamssm.kernels.ssd.reference import ssd_scan_ref
from streamssm.testing import assert_close, assert_script_compiles_for_sm90, peak_bytes_allocated

# Triton's interpreter converts 1-element arrays to ints (loop bounds from loaded lengths)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(b, l, h, p, g, n, *, D=None, z=False, bias=False, init=False, rows=None, device="cpu",
            dtype=torch.float32, softplus=True, weight=False):
    """Random SSD inputs; dt is raw (softplus'd in the op) unless ``softplus`` is False;
    ``weight``: input weights apart from dt (Mamba-3's trapezoid); D per head ("h"), per head and
    channel ("hp") or per token ("token": Mamba-3's skip)."""
    rows = b if rows is None else rows
    kw = dict(device=device, dtype=dtype)
    t = {
        "x": torch.randn(b, l, h, p, **kw),
        "dt": (torch.randn(b, l, h, **kw) - 1.0) if softplus else torch.rand(b, l, h, **kw) * 0.5 + 0.05,
        "A": -(torch.rand(h, device=device) * 2 + 0.2),
        "B": torch.randn(b, l, g, n, **kw),
        "C": torch.randn(b, l, g, n, **kw),
        "D": None if D is None else torch.randn(*{"h": (h,), "hp": (h, p), "token": (b, l, h)}[D], device=device),
        "z": torch.randn(b, l, h, p, **kw) if z else None,
        "dt_bias": torch.randn(h, device=device) * 0.5 if bias else None,
        "initial_state": torch.randn(rows, h, p, n, device=device) if init else None,
    }
    if weight:
        t["input_weight"] = torch.rand(b, l, h, device=device) + 0.05
    return t


def _run(backend, t, chunk_size, softplus=True, cu_seqlens=None, seed=1):
    """Forward + backward; returns {"y", "final", "d<name>"...}."""
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in t.items()}
    y, final = ssd_scan(
        leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=chunk_size,
        D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=softplus,
        initial_state=leaves["initial_state"], cu_seqlens=cu_seqlens, return_final_state=True, backend=backend,
        input_weight=leaves.get("input_weight"),
    )
    gen = torch.Generator(device=y.device).manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
    dh = torch.randn(final.shape, generator=gen, device=y.device, dtype=final.dtype)
    ((y * dy).sum() + (final * dh).sum()).backward()
    out = {"y": y.detach(), "final": final.detach()}
    out.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    return out


def _compare(ref, got, dtype=torch.float32):
    assert set(ref) == set(got)
    for name in ref:
        assert got[name] is not None, f"{name}: no gradient"
        assert_close(name, ref[name], got[name], dtype)


CASES = {
    # id: (b, l, h, p, g, n, chunk, options)
    "B2-T37-H4-P8-G2-N8-Q16-Dhp-z-bias-h0": (2, 37, 4, 8, 2, 8, 16, dict(D="hp", z=True, bias=True, init=True)),
    "B1-T1-H2-P4-G1-N4-Q16-Dh": (1, 1, 2, 4, 1, 4, 16, dict(D="h")),
    "B2-T50-H2-P16-G1-N16-Q32-Dh-h0-nosoftplus": (2, 50, 2, 16, 1, 16, 32, dict(D="h", init=True, softplus=False)),
    "B1-T53-H3-P5-G3-N6-Q24-h0": (1, 53, 3, 5, 3, 6, 24, dict(init=True)),
    # three heads a group, all in one program (no atomics): the dC kernel's per-head dAcs rows and K sum
    "B1-T45-H6-P8-G2-N8-Q16-Dh-z-h0": (1, 45, 6, 8, 2, 8, 16, dict(D="h", z=True, init=True)),
    "B2-T37-H4-P8-G2-N8-Q16-weight-bias-h0": (2, 37, 4, 8, 2, 8, 16, dict(D="h", z=True, bias=True, init=True,
                                                                         weight=True)),
    "B1-T19-H2-P4-G1-N4-Q8-weight-nosoftplus": (1, 19, 2, 4, 1, 4, 8, dict(weight=True, softplus=False)),
    "B2-T37-H4-P8-G2-N8-Q16-Dtoken-z-bias-h0": (2, 37, 4, 8, 2, 8, 16, dict(D="token", z=True, bias=True, init=True)),
    "B2-T37-H4-P8-G1-N8-Q16-Dtoken-weight-h0": (2, 37, 4, 8, 1, 8, 16, dict(D="token", init=True, weight=True,
                                                                           softplus=False)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case):
    b, l, h, p, g, n, q, opts = CASES[case]
    softplus = opts.pop("softplus", True)
    t = _inputs(b, l, h, p, g, n, softplus=softplus, **opts)
    _compare(_run("reference", t, q, softplus), _run("triton", t, q, softplus))


def test_strong_decay_in_a_short_last_chunk():
    """A chunk that decays by more than e^88 and ends short of a row block: the backward's rows
    past its end (their Acs read as 0) must not reach the sums over rows (on the H100 the first
    run of the head-summed backward gave NaN dA, ddt: 0 * inf in the column sums)."""
    t = _inputs(1, 40, 2, 8, 1, 8, D="h", softplus=False)  # chunks of 32 and 8 tokens
    t["dt"] = torch.rand_like(t["dt"]) * 2 + 5.0
    t["A"] = torch.tensor([-2.5, -3.0])  # ~ -15 a token
    _compare(_run("reference", t, 32, softplus=False), _run("triton", t, 32, softplus=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_backward_peak_memory_within_budget(dtype):
    """The tensor memory alive at once in one fwd+bwd stays within what the backward needs at its
    peak, by name. A fwd+bwd at S1 went from 0.446 to 0.576 GiB when autograd began handing the
    backward zero gradients for the kept outputs (the states, as large as x in bf16 here and at
    S1: 96 MiB); bf16: the fp32 dB and dC are cast after the backward's temporaries are freed."""
    b, l, h, p, g, n, q = 1, 128, 6, 16, 1, 32, 32
    t = _inputs(b, l, h, p, g, n, D="h", bias=True, dtype=dtype)
    leaves = [t[k].clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
    dy = torch.randn(b, l, h, p, dtype=dtype)

    def step():
        x, dt, A, B, C, D, dt_bias = leaves
        y = ssd_scan(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dt_bias, dt_softplus=True, backend="triton")
        torch.autograd.grad(y, leaves, dy)

    step()  # autotuning (one config here) and caches outside the measurement
    peak = peak_bytes_allocated(step, *leaves, dy)
    fp32, chunks = 4, b * l // q
    x_bytes = b * l * h * p * dtype.itemsize  # the output y and dx
    state_bytes = chunks * h * p * n * fp32  # the kept chunk-entering states and their gradients
    cb_bytes = chunks * g * q * q * fp32  # C_t . B_s, recomputed in fp32 for the backward; its gradient K
    bc_bytes = b * l * g * n * fp32  # the fp32 dB and dC accumulators
    small = state_bytes // 2  # (chunks, h, Q) fp32 tables, dD partials, ddt: 0.38 x the states here
    budget = 2 * x_bytes + 2 * state_bytes + 2 * cb_bytes + 2 * bc_bytes + small
    assert peak <= budget, f"peak {peak} B > budget {budget} B ({(peak - budget) / state_bytes:.2f} x the states)"


def test_gradient_through_the_final_state_only():
    """The output unused: its gradient reaches the backward as None (no zeros materialized)."""
    t = _inputs(1, 37, 2, 8, 1, 8, bias=True, init=True)  # no D: the final state does not depend on it
    grads = {}
    for backend in ("reference", "triton"):
        leaves = {k: v.clone().requires_grad_() for k, v in t.items() if v is not None}
        _, final = ssd_scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=16,
                            dt_bias=leaves["dt_bias"], dt_softplus=True,
                            initial_state=leaves["initial_state"], return_final_state=True, backend=backend)
        (final * torch.linspace(-1, 1, final.numel()).view(final.shape)).sum().backward()
        grads[backend] = {f"d{k}": v.grad for k, v in leaves.items()}
    ref, got = grads["reference"], grads["triton"]
    assert ref.pop("dC") is None and not got.pop("dC").any()  # C only reads the states out
    _compare(ref, got)


def test_non_contiguous_inputs():
    b, l, h, p, g, n = 2, 21, 2, 8, 1, 8
    t = _inputs(b, l, h, p, g, n, D="h", init=True)
    want = _run("reference", t, 16)
    t["x"] = t["x"].transpose(2, 3).contiguous().transpose(2, 3)  # (b, l, h, p) with p strided
    t["B"] = torch.cat([t["B"], torch.randn_like(t["B"])], dim=-1)[..., :n]  # row stride 2n
    t["dt"] = t["dt"].transpose(0, 1).contiguous().transpose(0, 1)  # batch not outermost
    assert not (t["x"].is_contiguous() or t["B"].is_contiguous() or t["dt"].is_contiguous())
    _compare(want, _run("triton", t, 16))
    fused = ssd_fused_fwd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], None, None, t["initial_state"], True, None)
    assert_close("y (one-pass forward)", want["y"], fused[0], torch.float32)
    assert_close("final (one-pass forward)", want["final"], fused[1], torch.float32)


@pytest.mark.parametrize("D", ["h", "token"])
def test_packed_sequences_match_reference(D):
    """Packed rows with an empty sequence, a 1-step one and lengths that do not fill chunks."""
    bounds = [0, 5, 5, 6, 30, 47]
    h, p, g, n = 2, 8, 1, 8
    t = _inputs(1, bounds[-1], h, p, g, n, D=D, z=True, bias=True, init=True, rows=len(bounds) - 1)
    cu = torch.tensor(bounds, dtype=torch.int32)
    _compare(_run("reference", t, 16, cu_seqlens=cu), _run("triton", t, 16, cu_seqlens=cu))
    t["input_weight"] = torch.rand(t["dt"].shape)
    _compare(_run("reference", t, 16, cu_seqlens=cu), _run("torch", t, 16, cu_seqlens=cu))
    _compare(_run("reference", t, 16, cu_seqlens=cu), _run("triton", t, 16, cu_seqlens=cu))


def test_input_weight_replaces_dt_only_in_the_input_term():
    """w = dt gives the plain scan; another w changes the outputs but leaves a zero-input
    decay alone (the torch path: what the Triton cases are compared through the reference)."""
    t = _inputs(2, 23, 2, 4, 1, 4, init=True, softplus=False)
    base = _run("torch", t, 8, softplus=False)
    same = _run("torch", dict(t, input_weight=t["dt"].clone()), 8, softplus=False)
    assert_close("y (w = dt)", base["y"], same["y"], torch.float32)
    assert_close("ddt (w = dt: ddt + dw)", base["ddt"], same["ddt"] + same["dinput_weight"], torch.float32)
    zero = _run("torch", dict(t, input_weight=torch.zeros_like(t["dt"])), 8, softplus=False)
    decay = torch.exp((t["dt"] * t["A"]).sum(1))  # (b, h): the initial state's decay over the call
    assert_close("final (w = 0)", t["initial_state"] * decay[..., None, None], zero["final"], torch.float32)


# training calls the one-pass forward takes (short sequences here): chunk sizes that are multiples
# of its largest tile (the interpreter's: 32), chunk boundaries inside the sequences
SAVING_CASES = {
    "B2-T75-H4-P8-G2-N8-Q32-Dhp-z-bias-h0": (2, 75, 4, 8, 2, 8, 32, dict(D="hp", z=True, bias=True, init=True)),
    "B1-T70-H2-P16-G1-N16-Q64-Dtoken-z-weight": (1, 70, 2, 16, 1, 16, 64, dict(D="token", z=True, weight=True)),
    "B1-T100-H4-P8-G1-N8-Q32-packed-Dh-z-h0": (1, 100, 4, 8, 1, 8, 32, dict(D="h", z=True, init=True, rows=4)),
}


@pytest.mark.parametrize("case", list(SAVING_CASES), ids=list(SAVING_CASES))
def test_training_forward_in_one_pass_matches_reference(case, monkeypatch):
    """A training call with many sequences x heads, or short ones, runs the one-pass forward,
    which also saves the states entering the backward's chunks (and, with z, the ungated
    output): outputs, final states and every gradient equal the reference's, and that path ran."""
    b, l, h, p, g, n, q, opts = SAVING_CASES[case]
    cu = torch.tensor([0, 5, 40, 41, 100], dtype=torch.int32) if "packed" in case else None
    t = _inputs(b, l, h, p, g, n, **opts)
    want = _run("reference", t, q, cu_seqlens=cu)
    taken = []
    real = combined.ssd_fused_fwd_saving
    monkeypatch.setattr(combined, "ssd_fused_fwd_saving", lambda *args: taken.append(args[-1]) or real(*args))
    _compare(want, _run("triton", t, q, cu_seqlens=cu))
    assert taken and taken[0].chunk_size == q


def test_packed_equals_each_alone():
    bounds = [0, 11, 40]
    h, p, g, n = 2, 8, 1, 8
    t = _inputs(1, bounds[-1], h, p, g, n, D="h", init=True, rows=2)
    cu = torch.tensor(bounds, dtype=torch.int64)
    y, final = ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=16, D=t["D"], dt_softplus=True,
                        initial_state=t["initial_state"], cu_seqlens=cu, return_final_state=True, backend="triton")
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        y_i, f_i = ssd_scan(t["x"][:, s:e], t["dt"][:, s:e], t["A"], t["B"][:, s:e], t["C"][:, s:e], chunk_size=16,
                            D=t["D"], dt_softplus=True, initial_state=t["initial_state"][i:i + 1],
                            return_final_state=True, backend="triton")
        assert_close(f"y[seq {i}]", y_i, y[:, s:e], rtol=1e-5, atol=1e-5)
        assert_close(f"final[seq {i}]", f_i, final[i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["split", "fused"])
def test_chunked_calls_carrying_state_equal_one_call(path):
    """Both forwards: the split one (inputs needing gradients) and the one-pass inference one."""
    b, l, h, p, g, n = 2, 40, 2, 8, 1, 8
    t = _inputs(b, l, h, p, g, n, D="h", z=True, bias=True, init=True)
    t["x"].requires_grad_(path == "split")
    kw = dict(chunk_size=16, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, return_final_state=True,
              backend="triton")
    y, final = ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], z=t["z"], initial_state=t["initial_state"], **kw)
    state, ys = t["initial_state"], []
    for s, e in [(0, 13), (13, 29), (29, 40)]:
        y_i, state = ssd_scan(t["x"][:, s:e], t["dt"][:, s:e], t["A"], t["B"][:, s:e], t["C"][:, s:e],
                              z=t["z"][:, s:e], initial_state=state, **kw)
        ys.append(y_i)
    assert_close("y chunked", y.detach(), torch.cat(ys, dim=1).detach(), rtol=1e-5, atol=1e-5)
    assert_close("final chunked", final.detach(), state.detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- one-pass inference forward

FUSED_CASES = {
    # id: (b, l, h, p, g, n, options); lengths cross the kernel's chunks (32 tokens in the interpreter)
    "B2-T150-H4-P8-G2-N8-Dhp-z-bias-h0": (2, 150, 4, 8, 2, 8, dict(D="hp", z=True, bias=True, init=True)),
    "B1-T1-H2-P4-G1-N4-Dh": (1, 1, 2, 4, 1, 4, dict(D="h")),
    "B2-T64-H2-P16-G1-N16-h0-nosoftplus": (2, 64, 2, 16, 1, 16, dict(D="h", init=True, softplus=False)),
    "B1-T130-H3-P5-G3-N6-h0": (1, 130, 3, 5, 3, 6, dict(init=True)),
    "B2-T70-H2-P8-G1-N8-weight-bias-h0": (2, 70, 2, 8, 1, 8, dict(D="h", z=True, bias=True, init=True, weight=True)),
    "B2-T70-H4-P8-G2-N8-Dtoken-weight-z-h0": (2, 70, 4, 8, 2, 8, dict(D="token", z=True, init=True, weight=True)),
}


@pytest.mark.parametrize("case", list(FUSED_CASES), ids=list(FUSED_CASES))
def test_fused_forward_matches_reference(case):
    b, l, h, p, g, n, opts = FUSED_CASES[case]
    softplus = opts.pop("softplus", True)
    t = _inputs(b, l, h, p, g, n, softplus=softplus, **opts)
    want = ssd_scan_ref(**t, dt_softplus=softplus, return_final_state=True)
    got = ssd_fused_fwd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], t["initial_state"],
                        softplus, None, t.get("input_weight"))
    assert_close("y", want[0], got[0], torch.float32)
    assert_close("final", want[1], got[1], torch.float32)


@pytest.mark.parametrize("D", ["h", "token"])
def test_fused_forward_packed_sequences(D):
    """Packed rows with an empty sequence, a 1-step one, one ending on a chunk edge and one
    spanning three chunks: each equals the reference run alone (empty: final = initial)."""
    bounds = [0, 5, 5, 6, 70, 200]
    h, p, g, n = 2, 8, 1, 8
    t = _inputs(1, bounds[-1], h, p, g, n, D=D, z=True, bias=True, init=True, rows=len(bounds) - 1)
    y, final = ssd_fused_fwd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                             t["initial_state"], True, torch.tensor(bounds, dtype=torch.int32))
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq = {k: (v[:, s:e] if k in ("x", "dt", "B", "C", "z") or (k, D) == ("D", "token") else v)
               for k, v in t.items()}
        seq["initial_state"] = t["initial_state"][i:i + 1]
        y_i, f_i = ssd_scan_ref(**seq, dt_softplus=True, return_final_state=True)
        assert_close(f"y[seq {i}]", y_i, y[:, s:e], torch.float32)
        assert_close(f"final[seq {i}]", f_i, final[i:i + 1], torch.float32)


def test_inference_calls_take_the_fused_forward(monkeypatch):
    """A call needing no gradient runs the one-pass forward (many streams, or short rows), one
    needing them the split forward, a long few-stream call too; all three give the same result."""
    import streamssm.kernels.library as lib

    calls = []
    for name in ("ssd_scan_infer", "ssd_scan_fwd"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    t = _inputs(2, 40, 2, 8, 1, 8, D="h", z=True, bias=True, init=True)
    kw = dict(chunk_size=16, D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True,
              return_final_state=True, backend="triton")
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    fused = ssd_scan(*args, initial_state=t["initial_state"], **kw)
    split = ssd_scan(*args, initial_state=t["initial_state"].clone().requires_grad_(), **kw)
    monkeypatch.setattr(lib, "use_fused_forward", lambda seqs, heads, longest: False)
    long_few = ssd_scan(*args, initial_state=t["initial_state"], **kw)
    assert calls == ["ssd_scan_infer", "ssd_scan_fwd", "ssd_scan_fwd"]
    for name, a, b, c in zip(("y", "final"), fused, split, long_few):
        assert_close(name, b.detach(), a, rtol=1e-5, atol=1e-5)
        assert_close(name, c, a, rtol=1e-5, atol=1e-5)


def _pool_case(seed=4):
    """A 5-row state pool and 3 sequences whose states live in rows 3, 0, 4 (1 and 2 idle)."""
    torch.manual_seed(seed)
    t = _inputs(3, 45, 4, 8, 2, 8, D="h", z=True, bias=True)
    pool = torch.randn(5, 4, 8, 8)
    return t, pool, torch.tensor([3, 0, 4])


@pytest.mark.parametrize("path", ["in_kernel", "gathered", "torch", "reference"])
def test_pool_forward_reads_and_writes_its_rows(path, monkeypatch):
    """ssd_scan_pool equals ssd_scan from the gathered rows, its final states land in those rows
    and the idle rows keep every bit: read and written by the one-pass kernel (no gradient), or
    gathered and scattered (the split forward, the CPU backends)."""
    import streamssm.kernels.library as lib

    t, pool, rows = _pool_case()
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    kw = dict(chunk_size=16, D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    want_y, want_final = ssd_scan_ref(*args, initial_state=pool[rows], return_final_state=True, **kw)
    calls = []
    real = lib.ssd_scan_infer_pool
    monkeypatch.setattr(lib, "ssd_scan_infer_pool", lambda *a: calls.append(a) or real(*a))
    if path == "gathered":
        monkeypatch.setattr(lib, "use_fused_forward", lambda seqs, heads, longest: False)
    backend = {"in_kernel": "triton", "gathered": "triton"}.get(path, path)
    got_pool = pool.clone()
    y = ssd_scan_pool(got_pool, *args, state_indices=rows, backend=backend, **kw)
    assert len(calls) == (path == "in_kernel")
    assert_close("y", want_y, y, torch.float32)
    assert_close("pool rows", want_final, got_pool[rows], torch.float32)
    assert torch.equal(got_pool[[1, 2]], pool[[1, 2]])


def test_pool_forward_without_indices_uses_one_row_per_sequence():
    t, pool, _ = _pool_case()
    pool = pool[:3].clone()
    want_y, want_final = ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, t["D"], t["z"], t["dt_bias"], True,
                                  pool.clone(), return_final_state=True, backend="triton")
    y = ssd_scan_pool(pool, t["x"], t["dt"], t["A"], t["B"], t["C"], 16, t["D"], t["z"], t["dt_bias"], True,
                      backend="triton")
    assert torch.equal(want_y, y) and torch.equal(want_final, pool)


def test_pool_forward_bad_pool_or_rows_are_named():
    t, pool, rows = _pool_case()
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    with pytest.raises(ShapeError, match="ssm_state"):
        ssd_scan_pool(pool[:, :2], *args, state_indices=rows, backend="triton")
    with pytest.raises(ShapeError, match="ssm_state"):
        ssd_scan_pool(pool.double(), *args, state_indices=rows, backend="triton")
    with pytest.raises(ShapeError, match="state_indices"):
        ssd_scan_pool(pool, *args, state_indices=rows[:2], backend="triton")
    with pytest.raises(ShapeError, match="state_indices"):
        ssd_scan_pool(pool, *args, state_indices=rows.float(), backend="triton")
    with pytest.raises(ShapeError, match="rows but the input batch is 3"):
        ssd_scan_pool(pool, *args, backend="triton")
    with pytest.raises(ShapeError, match="dt"):
        ssd_scan_pool(pool, t["x"], t["dt"][:, :4], *args[2:], state_indices=rows, backend="triton")


def test_fused_forward_is_used_for_many_streams_or_short_rows():
    assert use_fused_forward(384, 16, 320)  # serving: 384 streams x 16 heads
    assert use_fused_forward(1, 8, 1024)  # one short stream
    assert use_fused_forward(8, 24, 4096)  # S1: 192 sequence-heads of 4,096 tokens (measured faster)
    assert not use_fused_forward(2, 32, 16384)  # S2: 64 sequence-heads of 16k tokens
    assert not use_fused_forward(1, 8, 1 << 20)  # S3: one million-step sequence, 8 heads


@pytest.mark.parametrize("D", ["hp", "token"])
def test_chunked_float64_reference_matches_sequential(D):
    """The GPU tests' accurate reference: the chunked path in float64 (bf16 inputs promoted)."""
    t = _inputs(2, 45, 4, 6, 2, 5, D=D, z=True, bias=True, init=True)
    t64 = {k: v.double() for k, v in t.items()}
    kw = dict(D=t64["D"], z=t64["z"], dt_bias=t64["dt_bias"], dt_softplus=True, initial_state=t64["initial_state"],
              return_final_state=True)
    y0, f0 = ssd_scan_ref(t64["x"], t64["dt"], t64["A"], t64["B"], t64["C"], **kw)
    y1, f1 = ssd_scan_chunked(t64["x"], t64["dt"], t64["A"], t64["B"], t64["C"], chunk_size=16, **kw)
    assert y1.dtype == f1.dtype == torch.float64
    assert_close("y", y0, y1, torch.float64)
    assert_close("final", f0, f1, torch.float64)
    kw16 = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y2 = ssd_scan_chunked(*(t64[k].bfloat16() for k in ("x", "dt", "A", "B", "C")), chunk_size=16,
                          compute_dtype=torch.float64, **{**kw16, "return_final_state": False})
    assert y2.dtype == torch.float64


def _causal_valid(layout) -> torch.Tensor:
    """(T, Q, Q) bool: the entries of CB the kernel defines (s <= t < the chunk's length)."""
    q = torch.arange(layout.chunk_size, device=layout.lengths.device)
    inside = q[None, :] < layout.lengths.long()[:, None]  # (T, Q)
    return (q[:, None] >= q[None, :]) & inside[:, :, None] & inside[:, None, :]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_chunk_cb_matches_reference(packed):
    """C_t . B_s per chunk and group: partial chunks, a chunk not a multiple of the tile, N over
    several K blocks (not a power of two), several groups, non-contiguous B."""
    g, n, q = 2, 21, 24
    if packed:
        cu = torch.tensor([0, 5, 5, 6, 30, 77])
        layout = chunk_layout(1, 77, q, cu, torch.device("cpu"))
        L = 77
    else:
        layout, L = chunk_layout(2, 53, q, None, torch.device("cpu")), 2 * 53
    C = torch.randn(L, g, n)
    B = torch.randn(L, g, 2 * n)[..., ::2]  # (L, g, n) with element stride 2
    valid = _causal_valid(layout)[:, None].expand(-1, g, -1, -1)
    ref = chunk_cb_ref(C, B, layout)
    got = _chunk_cb_fwd(C, B, layout, torch.float32)
    assert got.shape == ref.shape == (layout.num_chunks, g, q, q) and got.dtype == torch.float32
    assert_close("CB", ref[valid], got[valid])
    assert (ref[~valid] == 0).all()
    # half-width products for low-precision runs (fp16 here: the interpreter misreads bf16 loads)
    got16 = _chunk_cb_fwd(C.half(), B.half(), layout, torch.float16)
    assert got16.dtype == torch.float16
    assert_close("CB fp16", ref[valid], got16[valid], torch.float16)
    # the backward's: half-width inputs, fp32 products
    got32 = _chunk_cb_fwd(C.half(), B.half(), layout, torch.float32)
    assert got32.dtype == torch.float32
    assert_close("CB fp16 -> fp32", chunk_cb_ref(C.half(), B.half(), layout)[valid], got32[valid])


def test_scans_read_only_the_causal_products(monkeypatch):
    """Forward and backward give the reference's results when every CB entry the kernel leaves
    unspecified (above the diagonal, past a chunk's length) is NaN: the readers mask them."""
    real = combined._chunk_cb_fwd

    def poisoned(C, B, layout, dtype):
        cb = real(C, B, layout, dtype)
        return cb.masked_fill(~_causal_valid(layout)[:, None], float("nan"))

    bounds = [0, 5, 6, 30, 47]
    t = _inputs(1, bounds[-1], 4, 8, 2, 8, D="h", z=True, bias=True, init=True, rows=len(bounds) - 1)
    cu = torch.tensor(bounds, dtype=torch.int32)
    want = _run("reference", t, 16, cu_seqlens=cu)
    monkeypatch.setattr(combined, "_chunk_cb_fwd", poisoned)
    _compare(want, _run("triton", t, 16, cu_seqlens=cu))


def test_bad_inputs_raise_shape_error():
    t = _inputs(2, 8, 4, 4, 2, 4)
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    with pytest.raises(ShapeError, match="dt"):
        ssd_scan(x, dt[:, :5], A, B, C, backend="triton")
    with pytest.raises(ShapeError, match="heads"):
        ssd_scan(x, dt, A, torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 4), backend="triton")
    with pytest.raises(ShapeError, match="initial_state"):
        ssd_scan(x, dt, A, B, C, initial_state=torch.randn(1, 4, 4, 4), backend="triton")
    with pytest.raises(ShapeError, match="batch 1"):
        ssd_scan(x, dt, A, B, C, cu_seqlens=torch.tensor([0, 8]), backend="triton")
    with pytest.raises(ShapeError, match="cu_seqlens"):
        ssd_scan(x[:1], dt[:1], A, B[:1], C[:1], cu_seqlens=torch.tensor([0, 3, 7]), backend="triton")
    with pytest.raises(ShapeError, match="D"):
        ssd_scan(x, dt, A, B, C, D=torch.randn(4, 3), backend="triton")
    with pytest.raises(ShapeError, match=r"D.*\(2, 8, 4\)"):  # per token: (b, l, h)
        ssd_scan(x, dt, A, B, C, D=torch.randn(2, 7, 4), backend="triton")
    with pytest.raises(ShapeError, match="input_weight"):
        ssd_scan(x, dt, A, B, C, input_weight=dt[:, :, :2], backend="triton")


SM90_COMPILE = """
from streamssm.kernels.ssd import bmm_chunk, chunk_scan, chunk_scan_bwd, fused_fwd
from streamssm.testing import compile_for_sm90

# realtime / S1-S3 sizes
SHAPE = dict(CHUNK=256, BLOCK_P=64, BLOCK_N=128, HAS_Z=True)
INT = {"p_cstart": "*i64", "p_clen": "*i32", "p_bounds": "*i32", "p_rows": "*i64", "p_seqoff": "*i32"}
# the one-pass forward as a training forward (SAVE: the superset of the inference variant)
FUSED = dict(HAS_BOUNDS=True, HAS_INIT=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, HAS_W=True, HAS_ROWS=True, SAVE=True)
BWD = {"p_cb", "p_states", "p_dstates", "p_dt_out", "p_dA_cs", "p_D", "p_ddA_cs", "p_ddt", "p_ddA_last", "p_dD_part",
       "p_ddA_row", "p_ddA_col"}  # and K (p_dcb) where the dC kernel adds it atomically
# per kernel: (meta-parameters, the pointers that stay fp32 in a bf16 run); the backward reads an fp32 CB
for kernel, variants in (
        (bmm_chunk._chunk_cb_fwd_kernel, [({}, set()), ({}, {"p_cb"})]),
        (chunk_scan._chunk_scan_fwd_kernel, [({}, {"p_D", "p_dt_out", "p_dA_cs", "p_states"})]),
        (fused_fwd._ssd_fused_fwd_kernel,
         [(FUSED, {"p_A", "p_D", "p_dt_bias", "p_init", "p_final", "p_w", "p_states"})]),
        (chunk_scan_bwd._chunk_scan_bwd_dc_kernel, [(dict(ATOMIC=False), BWD | {"p_dC"}),
                                                     (dict(ATOMIC=True), BWD | {"p_dC", "p_dcb"})]),
        (chunk_scan_bwd._chunk_scan_bwd_dx_kernel, [(dict(ATOMIC=False), BWD), (dict(ATOMIC=True), BWD | {"p_dB"})])):
    fn = kernel.fn  # the JITFunction under the autotuner
    for cfg in kernel.configs:  # every config autotuning may pick: one that fails to compile is silently dropped
        if kernel.fn.__module__ == chunk_scan_bwd.__name__:  # dD_part has a row of partials per 32-row block
            assert cfg.kwargs["BLOCK_T"] >= chunk_scan_bwd._GPU_MIN_BLOCK_T, (kernel.fn.__name__, cfg)
        # D per head (Mamba-2) in bf16 and fp32; per token (Mamba-3's skip) in bf16
        runs = [("*bf16", "tf32", v, 1) for v in variants] + [("*fp32", "ieee", variants[0], 1)]
        for half, prec, (meta, fp32), d_kind in runs + [("*bf16", "tf32", variants[0], 3)] * ("D_KIND" in fn.arg_names):
            binary = compile_for_sm90(fn, {**SHAPE, **meta, **cfg.kwargs, "DOT_PREC": prec, "D_KIND": d_kind},
                                      lambda a: INT.get(a) or ("*fp32" if a in fp32 else half),
                                      cfg.num_warps, cfg.num_stages)
            assert binary.metadata.shared <= 227 * 1024, (fn.__name__, cfg, half, binary.metadata.shared)
"""


def test_kernels_compile_for_sm90():
    """The chunk-scan kernels, the C.B kernel they read and the one-pass forward compile to
    sm_90 binaries in every autotune config, bf16 and fp32, within the H100's shared memory, and
    no backward config has fewer rows than dD_part's blocks assume (no
    GPU needed: Triton cross-compiles with its bundled ptxas; the interpreter runs none of the
    GPU pipeline)."""
    assert_script_compiles_for_sm90(SM90_COMPILE)


# ----------------------------------------------------------------------------- GPU (H100)


def _rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


GPU_CASES = {
    "B2-T4096-H8-P64-G1-N128": (2, 4096, 8, 64, 1, 128),
    "B1-T3000-H8-P64-G2-N64-short-chunk": (1, 3000, 8, 64, 2, 64),
    "B8-T320-H16-P64-G1-N128-realtime": (8, 320, 16, 64, 1, 128),  # 320-token rows: chunks of 256 and 64
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_matches_float64(case, dtype):
    """Outputs, final states and every gradient vs the float64 chunked reference (relative L2)."""
    b, l, h, p, g, n = GPU_CASES[case]
    t = _inputs(b, l, h, p, g, n, D="h", z=True, bias=True, init=True, device="cuda", dtype=dtype)
    got = _run("triton", t, 256)
    leaves = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in t.items()}
    y, final = ssd_scan_chunked(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=256,
                               D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True,
                               initial_state=leaves["initial_state"], return_final_state=True,
                               compute_dtype=torch.float64)
    gen = torch.Generator(device="cuda").manual_seed(1)
    dy = torch.randn(y.shape, generator=gen, device="cuda", dtype=dtype).double()
    dh = torch.randn(final.shape, generator=gen, device="cuda", dtype=torch.float32).double()
    ((y * dy).sum() + (final * dh).sum()).backward()
    ref = {"y": y, "final": final}
    ref.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    bound = 1e-4 if dtype == torch.float32 else 2e-2
    errs = {k: _rel_err(ref[k], got[k]) for k in ref}
    bad = {k: e for k, e in errs.items() if not e < bound}
    assert not bad, f"relative L2 errors over {bound}: {bad} (all: {errs})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", ["B384-T320-H16-P64-G1-N128", "B3-T1000-H8-P64-G2-N64", "B2-T4096-H8-P64-G1-N128"])
def test_gpu_fused_forward_matches_float64(case, dtype):
    """The one-pass inference forward vs the float64 chunked reference (relative L2): serving
    rows, odd lengths with two groups, long rows."""
    b, l, h, p, g, n = (int(part[1:]) for part in case.split("-"))
    t = _inputs(b, l, h, p, g, n, D="h", z=True, bias=True, init=True, device="cuda", dtype=dtype)
    y, final = ssd_fused_fwd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                             t["initial_state"], True, None)
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}
    y64, f64 = ssd_scan_chunked(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=256, D=d["D"], z=d["z"],
                                dt_bias=d["dt_bias"], dt_softplus=True, initial_state=d["initial_state"],
                                return_final_state=True, compute_dtype=torch.float64)
    bound = 1e-4 if dtype == torch.float32 else 2e-2
    errs = {"y": _rel_err(y64, y), "final": _rel_err(f64, final)}
    assert max(errs.values()) < bound, errs


@pytest.mark.gpu
def test_gpu_pool_forward_equals_gathered_forward_bit_for_bit():
    """Serving rows (300 streams of a 400-row pool, bf16): the kernel reading and writing pool rows
    gives exactly the one-pass forward of the gathered rows, and leaves the idle rows alone. Its
    first call autotunes (a sequence x heads count no other test uses): the pool must come out of
    the autotuner's reruns restored, then updated once."""
    torch.manual_seed(5)
    t = _inputs(300, 320, 16, 64, 1, 128, D="h", z=True, bias=True, device="cuda", dtype=torch.bfloat16)
    pool = torch.randn(400, 16, 64, 128, device="cuda")
    rows = torch.randperm(400, device="cuda")[:300]
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    got_pool = pool.clone()
    y = ssd_scan_pool(got_pool, *args, 64, t["D"], t["z"], t["dt_bias"], True, state_indices=rows)
    want_y, want_final = ssd_fused_fwd(*args, t["D"], t["z"], t["dt_bias"], pool[rows], True, None)
    idle = torch.ones(400, dtype=torch.bool, device="cuda")
    idle[rows] = False
    assert torch.equal(want_y, y)
    assert torch.equal(want_final, got_pool[rows])
    assert torch.equal(pool[idle], got_pool[idle])


@pytest.mark.gpu
def test_gpu_packed_matches_reference():
    bounds = [0, 700, 701, 2300, 2300, 4000]
    t = _inputs(1, bounds[-1], 4, 64, 1, 64, D="h", bias=True, init=True, rows=len(bounds) - 1, device="cuda")
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    got = _run("triton", t, 256, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if e == s:
            assert_close(f"final[{i}] (empty)", t["initial_state"][i], got["final"][i], rtol=0, atol=0)
            continue
        y, f = ssd_scan_chunked(t["x"][:, s:e], t["dt"][:, s:e], t["A"], t["B"][:, s:e], t["C"][:, s:e], 256,
                               D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True,
                               initial_state=t["initial_state"][i:i + 1], return_final_state=True,
                               compute_dtype=torch.float64)
        assert _rel_err(y, got["y"][:, s:e]) < 1e-4 and _rel_err(f, got["final"][i:i + 1]) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("chunk", [64, 256])
def test_gpu_chunk_cb_matches_reference(chunk, dtype):
    """The autotuned C.B kernel at the models' and the benchmarks' chunk sizes (partial last chunks)."""
    layout = chunk_layout(3, 700, chunk, None, torch.device("cuda"))
    C, B = (torch.randn(3 * 700, 2, 128, device="cuda", dtype=dtype) for _ in range(2))
    valid = _causal_valid(layout)[:, None].expand(-1, 2, -1, -1)
    ref = chunk_cb_ref(C.double(), B.double(), layout)
    got = _chunk_cb_fwd(C, B, layout, dtype)
    assert got.dtype == dtype
    assert_close("CB", ref[valid], got[valid], dtype)

