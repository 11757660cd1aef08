"""The causal depthwise conv1d in C (kernels/conv1d/conv_cpu.py): the "torch" backend's path for
fp32 calls without gradients on a CPU, chunked and one step, against the reference and each
other; its dispatch and its fallback."""

import pytest
import torch

import streamssm.kernels.conv1d.conv_cpu as conv_cpu
from streamssm.kernels import causal_conv1d, conv1d_step
from streamssm.kernels.conv1d.reference import causal_conv1d_ref, conv1d_step_ref
from streamssm.testing import assert_close

needs_compiler = pytest.mark.skipif(conv_cpu.library() is None, reason="no C++ compiler builds the CPU conv here")


def spy(monkeypatch) -> list[tuple]:
    calls = []
    conv = conv_cpu.causal_conv1d_cpu

    def recorded(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return conv(x, *args, **kwargs)

    monkeypatch.setattr(conv_cpu, "causal_conv1d_cpu", recorded)
    return calls


def inputs(b, d, l, w, channel_last, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=gen).transpose(1, 2) if channel_last else torch.randn(b, d, l, generator=gen)
    return x, torch.randn(d, w, generator=gen), torch.randn(d, generator=gen), torch.randn(b, d, w - 1, generator=gen)


@needs_compiler
@pytest.mark.parametrize("b, d, l, w", [(2, 5, 7, 4), (3, 8, 2, 4), (1, 3, 1, 2), (2, 6, 9, 3), (2, 40, 5, 4)])
@pytest.mark.parametrize("channel_last", [True, False])
@pytest.mark.parametrize("with_state, with_bias, activation", [(True, True, "silu"), (False, False, None),
                                                                (True, False, None), (False, True, "silu")])
def test_c_conv_matches_reference(monkeypatch, b, d, l, w, channel_last, with_state, with_bias, activation):
    """Outputs (to fp32 rounding) and final states (bit for bit: copies) equal the reference's, in
    the blocks' channel-last layout and time-contiguous, chunks shorter than the window included."""
    calls = spy(monkeypatch)
    x, weight, bias, state = inputs(b, d, l, w, channel_last, seed=b * d * l * w)
    bias, state = (bias if with_bias else None), (state if with_state else None)
    expected = causal_conv1d_ref(x, weight, bias, state, activation, return_final_state=True)
    got = causal_conv1d(x, weight, bias, state, activation, return_final_state=True, backend="torch")
    assert calls == [(b, d, l)]
    assert_close("conv y", expected[0], got[0])
    assert torch.equal(expected[1], got[1])


@needs_compiler
def test_gradients_and_other_dtypes_take_the_reference(monkeypatch):
    """The C conv has no backward and runs fp32 only: such calls run the reference."""
    calls = spy(monkeypatch)
    x, weight, bias, state = inputs(2, 4, 6, 4, True, seed=1)
    weight.requires_grad_(True)
    causal_conv1d(x, weight, bias, state, backend="torch").sum().backward()
    assert weight.grad is not None
    with torch.no_grad():
        causal_conv1d(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), state.bfloat16(), backend="torch")
        assert calls == []
        causal_conv1d(x, weight, bias, state, backend="torch")
    assert calls == [(2, 4, 6)]


def test_no_library_runs_the_reference(monkeypatch):
    """Where no C++ compiler builds the library, calls run the reference, with the same results."""
    monkeypatch.setattr(conv_cpu, "library", lambda: None)
    calls = spy(monkeypatch)
    x, weight, bias, state = inputs(2, 4, 6, 3, True, seed=2)
    expected = causal_conv1d_ref(x, weight, bias, state, return_final_state=True)
    got = causal_conv1d(x, weight, bias, state, return_final_state=True, backend="torch")
    assert calls == []
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


@needs_compiler
@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("activation", ["silu", None])
def test_c_steps_equal_the_c_chunked_conv(monkeypatch, w, activation):
    """A sequence stepped one token at a time through the C step (the pool's state updated in
    place) gives the chunked C conv's outputs (to fp32 rounding: the compiler may reassociate the
    taps) and its final state bit for bit (copies)."""
    steps = []
    step = conv_cpu.conv1d_step_c
    monkeypatch.setattr(conv_cpu, "conv1d_step_c", lambda *a: steps.append(1) or step(*a))
    b, d, l = 3, 37, 9
    x, weight, bias, state = inputs(b, d, l, w, channel_last=True, seed=w)
    y_chunk, final = causal_conv1d(x, weight, bias, state, activation, return_final_state=True, backend="torch")
    pool = state.clone()
    y_steps = torch.stack([conv1d_step(x[:, :, t], pool, weight, bias, activation, backend="torch")
                           for t in range(l)], dim=2)
    assert len(steps) == l
    assert_close("stepped y", y_chunk, y_steps)
    assert torch.equal(pool, final)


@needs_compiler
def test_step_falls_back_to_torch_ops_where_c_does_not_apply(monkeypatch):
    """bf16, an input whose channels are strided, no library: the PyTorch ops, with the reference's
    results. (A strided pool is gathered into a contiguous block, which the C step takes.)"""
    monkeypatch.setattr(conv_cpu, "conv1d_step_c", lambda *a: pytest.fail("the C step ran"))
    x, weight, bias, state = inputs(2, 6, 1, 4, channel_last=False, seed=3)
    x = x[:, :, 0]
    cases = [(x.bfloat16(), state.bfloat16()), (x.t().contiguous().t(), state.clone())]
    for xi, pool in cases:
        expected, new = conv1d_step_ref(pool.clone(), xi, weight, bias, "silu")
        got = conv1d_step(xi, pool, weight, bias, "silu", backend="torch")
        assert_close("step y", expected, got, xi.dtype)
        assert_close("step state", new, pool, xi.dtype)
    monkeypatch.setattr(conv_cpu, "library", lambda: None)
    expected, _ = conv1d_step_ref(state.clone(), x, weight, bias, "silu")
    assert_close("step y", expected, conv1d_step(x, state.clone(), weight, bias, "silu", backend="torch"))
