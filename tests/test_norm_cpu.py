"""The fused norms in C (kernels/norm/norm_cpu.py): the "torch" backend's path for fp32 calls
without gradients on a CPU, against the references; their dispatch and fallback."""

import pytest
import torch

import streamssm.kernels.norm.norm_cpu as norm_cpu
from streamssm.kernels import add_rms_norm
from streamssm.kernels.norm import gated_rms_norm
from streamssm.kernels.norm.reference import add_rms_norm_ref, gated_rms_norm_ref
from streamssm.testing import assert_close
from test_gated_rms_norm_kernel import inputs

needs_compiler = pytest.mark.skipif(norm_cpu.library() is None, reason="no C++ compiler builds the CPU norms here")


def spy(monkeypatch, name: str) -> list[tuple]:
    """Record the shapes of the first input of norm_cpu's ``name`` calls."""
    calls, fn = [], getattr(norm_cpu, name)
    monkeypatch.setattr(norm_cpu, name, lambda a, *rest: calls.append(tuple(a.shape)) or fn(a, *rest))
    return calls


@needs_compiler
@pytest.mark.parametrize("shape, groups", [((3, 16), 1), ((2, 5, 40), 1), ((2, 3, 96), 4), ((1, 7, 24), 3),
                                           ((0, 8), 2)])
@pytest.mark.parametrize("gate", [True, False])
def test_gated_norm_matches_reference(monkeypatch, shape, groups, gate):
    """Gate read in place from a strided slice (Mamba-2's in_proj), or none (the step's norm, its
    gate applied in the scan); per group or over all channels; no rows."""
    calls = spy(monkeypatch, "gated_rms_norm_cpu")
    y, z, w = inputs(shape, z_pad=7)
    z = z if gate else None
    got = gated_rms_norm(y, z, w, 1e-5, groups, backend="torch")
    assert calls == [shape]
    assert got.shape == y.shape and got.dtype == torch.float32
    assert_close("gated norm", gated_rms_norm_ref(y, z, w, 1e-5, groups), got, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("rows, d", [(5, 48), (1, 7), (33, 130)])
def test_add_norm_matches_reference(monkeypatch, rows, d):
    """The residual sum exactly (one add), the norm to rounding; a strided residual branch."""
    calls = spy(monkeypatch, "add_rms_norm_cpu")
    g = torch.Generator().manual_seed(rows * d)
    x, w = torch.randn(rows, d, generator=g), torch.rand(d, generator=g) + 0.5
    y = torch.randn(rows, d + 3, generator=g)[:, 3:]
    h, normed = add_rms_norm(x, y, w, 1e-5, backend="torch")
    want_h, want = add_rms_norm_ref(x, y, w, 1e-5)
    assert calls == [(rows, d)]
    assert torch.equal(h, want_h)
    assert_close("add norm", want, normed, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_gradients_and_other_dtypes_take_the_reference(monkeypatch):
    """No backward in C and fp32 only: a call recording gradients or in bf16 runs the reference."""
    gated, added = spy(monkeypatch, "gated_rms_norm_cpu"), spy(monkeypatch, "add_rms_norm_cpu")
    y, z, w = inputs((4, 16))
    w.requires_grad_(True)
    gated_rms_norm(y, z, w, 1e-5, backend="torch").sum().backward()
    add_rms_norm(y, z, w, 1e-5, backend="torch")[1].sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        gated_rms_norm(y.bfloat16(), z.bfloat16(), w, 1e-5, backend="torch")
        add_rms_norm(y.bfloat16(), z.bfloat16(), w.bfloat16(), 1e-5, backend="torch")
    assert gated == [] and added == []


def test_no_library_runs_the_reference(monkeypatch):
    """Where no C++ compiler builds the library, calls run the reference, with the same results."""
    monkeypatch.setattr(norm_cpu, "library", lambda: None)
    y, z, w = inputs((3, 2, 24))
    assert_close("fallback gated", gated_rms_norm_ref(y, z, w, 1e-5, 2),
                 gated_rms_norm(y, z, w, 1e-5, 2, backend="torch"))
    x2, y2 = y.reshape(-1, 24), z.reshape(-1, 24)
    got, want = add_rms_norm(x2, y2, w, 1e-5, backend="torch"), add_rms_norm_ref(x2, y2, w, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
