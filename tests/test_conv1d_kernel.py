"""Triton causal depthwise conv1d against the reference: outputs, final conv state, grads.

Each case backpropagates (y * dy).sum() + (final * dfinal).sum(); lengths shorter than w-1
exercise the path where the final state still holds part of the initial state.
"""

from __future__ import annotations

import pytest
import torch

from streamssm.errors import ShapeError
from streamssm.kernels import causal_conv1d
from streamssm.kernels.conv1d.reference import causal_conv1d_ref
from streamssm.testing import assert_close, assert_script_compiles_for_sm90


def make_inputs(b, d, l, w, bias=True, init=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    return dict(x=rnd(b, d, l), weight=rnd(d, w), bias=rnd(d) if bias else None,
                initial_state=rnd(b, d, w - 1) if init else None)


def run(fn, inputs, activation="silu", seed=1, cotangent_dtype=torch.float32, dy_layout="like y"):
    """Outputs and gradients of (y * dy).sum() + (final * dfinal).sum(). The cotangents are drawn
    in ``cotangent_dtype`` first (bf16 runs get bf16 dy; the float64 reference must see the same
    values, or its dweight differs by the rounding of dy summed over b * l terms). dy is laid out
    like y (what a consumer of y's (b, l, d) view hands back) or, with ``dy_layout="time"``,
    time-contiguous whatever y's layout."""
    y, final = fn(**inputs, activation=activation, return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g).to(cotangent_dtype).to(y)
    if dy_layout == "like y":
        dy = torch.empty_like(y).copy_(dy)  # empty_like keeps y's strides
    dfinal = torch.randn(final.shape, generator=g).to(cotangent_dtype).to(final)
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


def triton_conv(**kw):
    return causal_conv1d(**kw, backend="triton")


def check(inputs, activation="silu", dtype=torch.float32, dy_layout="like y"):
    ours = run(triton_conv, inputs, activation, cotangent_dtype=dtype, dy_layout=dy_layout)
    ref = run(causal_conv1d_ref, {k: (None if v is None else v.detach().double().requires_grad_())
                                  for k, v in inputs.items()}, activation, cotangent_dtype=dtype)
    assert_close("y", ref[0], ours[0], dtype)
    assert_close("final_state", ref[1], ours[1], dtype)
    for name in ours[2]:
        assert_close(f"d{name}", ref[2][name], ours[2][name], dtype)


CASES = {
    # id: (b, d, l, w, bias, init, activation)
    "B2-D5-L37-W4-bias-init-silu": (2, 5, 37, 4, True, True, "silu"),
    "B1-D3-L1-W4-init": (1, 3, 1, 4, False, True, "silu"),
    "B1-D4-L2-W3-bias-init-linear": (1, 4, 2, 3, True, True, None),
    "B2-D9-L7-W2-plain": (2, 9, 7, 2, False, False, "silu"),
    "B1-D4-L1-W3-noinit": (1, 4, 1, 3, True, False, None),
    # the backward walks 16-step tiles in 32-step segments under the interpreter: 3 segments here
    "B2-D3-L70-W3-bias-init-silu": (2, 3, 70, 3, True, True, "silu"),
    "B1-D5-L33-W4-init-linear": (1, 5, 33, 4, False, True, None),
    # segment ends (32 steps): exactly two segments of two whole tiles; a partial tile after a whole one; l < w
    "B2-D6-L64-W4-bias-init-silu": (2, 6, 64, 4, True, True, "silu"),
    "B1-D7-L17-W3-init-linear": (1, 7, 17, 3, False, True, None),
    "B2-D4-L3-W4-bias-silu": (2, 4, 3, 4, True, False, "silu"),
    "B1-D10-L5-W2-bias-init-silu": (1, 10, 5, 2, True, True, "silu"),
}


def channel_last(inputs: dict) -> dict:
    """The same inputs with x a transposed (b, l, d) tensor (how the blocks pass in_proj slices)."""
    x = inputs["x"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    return {**inputs, "x": x}


@pytest.mark.parametrize("layout", ["time", "channel-last"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, layout):
    b, d, l, w, bias, init, activation = CASES[case]
    inputs = make_inputs(b, d, l, w, bias, init)
    check(channel_last(inputs) if layout == "channel-last" else inputs, activation)


@pytest.mark.parametrize("layout", ["time", "channel-last"])
def test_dy_in_the_other_layout(layout):
    """dy need not share x's memory order (a consumer may hand back any strides): channel-last x
    with a time-contiguous dy, time-contiguous x with a channel-last dy."""
    inputs = make_inputs(2, 5, 37, 4, seed=9)
    dy = torch.randn(2, 5, 37, generator=torch.Generator().manual_seed(10))
    if layout == "channel-last":
        inputs = channel_last(inputs)
    else:
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2)
    assert (dy.stride(1) == 1) != (inputs["x"].stride(1) == 1)
    ours = torch.autograd.grad(triton_conv(**inputs, activation="silu"), list(inputs.values()), dy)
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref = torch.autograd.grad(causal_conv1d_ref(**leaves, activation="silu"), list(leaves.values()), dy.double())
    for name, want, got in zip(inputs, ref, ours):
        assert_close(f"d{name}", want, got)


@pytest.mark.parametrize("layout", ["time", "channel-last"])
@pytest.mark.parametrize("init", [True, False], ids=["init", "noinit"])
def test_backward_launcher_without_final_state_gradient(layout, init):
    """The launcher with dfinal=None (the HAS_DFINAL=False kernels; the op always passes one) gives
    the gradients of (y * dy).sum() alone."""
    from streamssm.kernels.conv1d.conv import _causal_conv1d_bwd

    inputs = make_inputs(2, 5, 21, 4, init=init, seed=11)
    inputs = channel_last(inputs) if layout == "channel-last" else inputs
    x, weight, bias, init_state = (inputs[k] for k in ("x", "weight", "bias", "initial_state"))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items() if v is not None}
    y_ref = causal_conv1d_ref(**leaves, activation="silu")
    ref = dict(zip(leaves, torch.autograd.grad(y_ref, list(leaves.values()), dy.double())))
    dx, dweight, dbias, dinit = _causal_conv1d_bwd(torch.empty_like(x).copy_(dy), None, x.detach(), weight.detach(),
                                                   bias.detach(), None if init_state is None else init_state.detach(),
                                                   True)
    assert_close("dx", ref["x"], dx)
    assert_close("dweight", ref["weight"], dweight)
    assert_close("dbias", ref["bias"], dbias)
    if init:
        assert_close("dinitial_state", ref["initial_state"], dinit)
    else:
        assert dinit is None


@pytest.mark.parametrize("layout", ["time", "channel-last"])
def test_chunked_calls_carrying_state_equal_one_call(layout):
    inputs = make_inputs(2, 5, 30, 4, seed=3)
    inputs = channel_last(inputs) if layout == "channel-last" else inputs
    y_full, s_full, g_full = run(triton_conv, inputs)

    def chunked(x, weight, bias, initial_state, activation, return_final_state):
        state, ys = initial_state, []
        for s, e in ((0, 1), (1, 3), (3, 19), (19, 30)):
            y, state = triton_conv(x=x[..., s:e], weight=weight, bias=bias, initial_state=state,
                                   activation=activation, return_final_state=True)
            ys.append(y)
        return torch.cat(ys, dim=-1), state

    y_ch, s_ch, g_ch = run(chunked, inputs)
    assert_close("chunked y", y_full, y_ch, rtol=1e-5, atol=1e-5)
    assert_close("chunked final_state", s_full, s_ch, rtol=1e-6, atol=1e-6)
    for name in g_full:
        assert_close(f"chunked d{name}", g_full[name], g_ch[name], rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    b, d, l, w = 2, 6, 25, 4
    g = torch.Generator().manual_seed(4)
    inputs = dict(
        x=torch.randn(b, l, d, generator=g).transpose(1, 2).requires_grad_(),  # (b, d, l) view
        weight=torch.randn(w, d, generator=g).t().requires_grad_(),  # (d, w) view
        bias=torch.randn(d, generator=g).requires_grad_(),
        initial_state=torch.randn(b, w - 1, d, generator=g).transpose(1, 2).requires_grad_(),
    )
    assert not inputs["x"].is_contiguous() and not inputs["weight"].is_contiguous()
    check(inputs)


def test_channel_last_input_gives_channel_last_output_and_gradient():
    """A transposed (b, l, d) slice (how the blocks pass in_proj outputs) comes back in the same
    memory order, so the block reads y as a contiguous (b, l, d) view; a strided dy is read as is."""
    b, d, l, w = 2, 6, 19, 3
    g = torch.Generator().manual_seed(6)
    proj = torch.randn(b, l, d + 5, generator=g).requires_grad_()
    x = proj[..., 2 : 2 + d].transpose(1, 2)  # (b, d, l), channels fastest, not dense
    weight, bias = torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    y = triton_conv(x=x, weight=weight, bias=bias, activation="silu")
    assert y.transpose(1, 2).is_contiguous()
    y_ref = causal_conv1d_ref(x.detach().double(), weight.double(), bias.double(), activation="silu")
    assert_close("channel-last y", y_ref, y, torch.float32)
    dy = torch.randn(b, d, l, generator=g)
    (dx,) = torch.autograd.grad(y, proj, dy[:, :, :].transpose(1, 2).contiguous().transpose(1, 2))
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(causal_conv1d_ref(x64, weight.double(), bias.double(), activation="silu"),
                                    x64, dy.double())
    assert_close("channel-last dx", dx_ref, dx[..., 2 : 2 + d].transpose(1, 2), torch.float32)
    assert torch.count_nonzero(dx[..., :2]) == 0 and torch.count_nonzero(dx[..., 2 + d :]) == 0


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.randn(4, 5)), "width must be 2..4"),
    (dict(weight=torch.randn(3, 4)), "weight must have shape"),
    (dict(initial_state=torch.randn(1, 4, 2)), "initial_state must have shape"),
    (dict(activation="relu"), "activation"),
    (dict(x=torch.randn(1, 4, 0)), "length 0"),
])
def test_bad_input_raises_shape_error(bad, message):
    inputs = {k: (None if v is None else v.detach()) for k, v in make_inputs(1, 4, 8, 4).items()}
    activation = bad.pop("activation", "silu")
    inputs.update(bad)
    with pytest.raises(ShapeError, match=message):
        causal_conv1d(**inputs, activation=activation, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, w", [(torch.float32, 4), (torch.bfloat16, 3)], ids=["fp32-W4", "bf16-W3"])
def test_gpu_realistic_sizes(dtype, w):
    check(make_inputs(4, 1536, 2049, w, dtype=dtype, device="cuda", seed=w), dtype=dtype)


@pytest.mark.gpu
def test_gpu_channel_last_realistic_sizes():
    """The blocks' layout (a transposed (b, l, d) in_proj slice, tuned with channel-wide tiles of
    its own) at a Mamba-2 conv's width, bf16, with the conv state in and out."""
    check(channel_last(make_inputs(2, 1792, 2049, 4, dtype=torch.bfloat16, device="cuda", seed=7)),
          dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_serving_shape_channel_last():
    """The serving call (384 streams x 320 tokens, 1280 channels: the 4 x d512 Mamba-2 LM's conv)
    in the blocks' layout, bf16, conv state in and out: one backward segment per program, 20 tiles."""
    check(channel_last(make_inputs(384, 1280, 320, 4, dtype=torch.bfloat16, device="cuda", seed=13)),
          dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["time", "channel-last"])
def test_gpu_long_sequence(layout):
    """b=2, l=65,536, d=1536 bf16: many backward segments per sequence, each walking many tiles."""
    inputs = make_inputs(2, 1536, 65536, 4, dtype=torch.bfloat16, device="cuda", seed=14)
    check(channel_last(inputs) if layout == "channel-last" else inputs, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["time", "channel-last"])
def test_gpu_backward_past_the_grid_axis(layout):
    """A sequence of 2^20 + 77 steps, forward and backward, bf16, W=4, with state: over 65,535 time
    blocks of the channel-last forward's 16-step tiles (time runs along the grid's x axis); the
    backwards' segments stay few (~PROGRAMS_PER_SM per SM), each walking thousands of steps."""
    inputs = make_inputs(1, 64, (1 << 20) + 77, 4, dtype=torch.bfloat16, device="cuda", seed=15)
    check(channel_last(inputs) if layout == "channel-last" else inputs, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_time_layout_offsets_past_int32():
    """Time-contiguous x whose channel offsets c * l pass 2^31 elements (d=2112, l=2^20, bf16: 4.4 GB
    a tensor), forward and backward with state: the last channels' outputs and gradients against
    the float64 reference of those channels alone (channels are independent). int32 channel offsets
    wrapped there (in the time-contiguous forward and backward before 2026-12-05 evening)."""
    b, d, l, w, k = 1, 2112, 1 << 20, 4, 8
    g = torch.Generator(device="cuda").manual_seed(16)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g, dtype=dtype)

    inputs = dict(x=rnd(b, d, l), weight=rnd(d, w, dtype=torch.float32), bias=rnd(d, dtype=torch.float32),
                  initial_state=rnd(b, d, w - 1))
    inputs = {name: v.requires_grad_() for name, v in inputs.items()}
    y, final = triton_conv(**inputs, activation="silu", return_final_state=True)
    dy, dfinal = rnd(b, d, l), rnd(b, d, w - 1)
    grads = torch.autograd.grad((y, final), list(inputs.values()), (dy, dfinal))
    last = {name: v.detach()[..., -k:, :] if v.dim() == 3 else v.detach()[-k:] for name, v in inputs.items()}
    ref_in = {name: v.double().requires_grad_() for name, v in last.items()}
    y_ref, final_ref = causal_conv1d_ref(**ref_in, activation="silu", return_final_state=True)
    ref_grads = torch.autograd.grad((y_ref, final_ref), list(ref_in.values()),
                                    (dy[:, -k:].double(), dfinal[:, -k:].double()))
    assert_close("y", y_ref, y[:, -k:], torch.bfloat16)
    assert_close("final_state", final_ref, final[:, -k:], torch.bfloat16)
    for name, want, got in zip(inputs, ref_grads, grads):
        assert_close(f"d{name}", want, got[:, -k:] if got.dim() == 3 else got[-k:], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_channel_last_sequence_longer_than_the_grid_axis():
    """Over 65535 time blocks of every channel-last forward tile (the grid's y/z axes stop there;
    time runs along x)."""
    b, d, l, w = 1, 64, (1 << 20) + 77, 4
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(b, l, d, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
    weight, bias = torch.randn(d, w, device="cuda", generator=g), torch.randn(d, device="cuda", generator=g)
    init = torch.randn(b, d, w - 1, device="cuda", generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        y, final = triton_conv(x=x, weight=weight, bias=bias, initial_state=init, return_final_state=True)
    y_ref, final_ref = causal_conv1d_ref(x.double(), weight.double(), bias.double(), init.double(),
                                         return_final_state=True)
    assert_close("long y", y_ref, y, torch.bfloat16)
    assert torch.equal(final, final_ref.to(final.dtype))

SM90_COMPILE = """
import sys

from streamssm.kernels.conv1d import conv
from streamssm.testing import compile_for_sm90

kernel, unit_strides = getattr(conv, sys.argv[1]), sys.argv[2].split(",")
fn = kernel.fn
half = {"p_x", "p_init", "p_y", "p_final", "p_dy", "p_dfinal", "p_dx", "p_dinit"}
channel_last = {} if len(sys.argv) < 4 else {"CHANNEL_LAST": sys.argv[3] == "channel-last"}
configs = conv._configs(conv._BWD_TILES[channel_last["CHANNEL_LAST"]], (8, 8)) if channel_last else kernel.configs
for config in configs:
    consts = dict(W=4, HAS_INIT=True, HAS_BIAS=True, SILU=True, HAS_DFINAL=True, s_wk=1, **config.kwargs,
                  **channel_last, **dict.fromkeys(unit_strides, 1))
    # all multiples of 16 (the vector loads of the benchmarks), and for one config strides as they come
    for aligned in (True, False) if config is configs[0] else (True,):
        compile_for_sm90(fn, consts, lambda a: "*bf16" if a in half else "*fp32", config.num_warps,
                         aligned=aligned, maxnreg=config.maxnreg)
"""


@pytest.mark.slow  # ~30 compiles: minutes on a busy 2-core CPU
@pytest.mark.parametrize("kernel, unit_strides, layout", [
    ("_causal_conv1d_fwd_kernel", "s_xl,s_yl", ""),
    ("_causal_conv1d_fwd_cl_kernel", "s_xd,s_yd", ""),
    ("_causal_conv1d_bwd_kernel", "s_xl,s_gl,s_dxl", "time"),
    ("_causal_conv1d_bwd_kernel", "s_xd,s_gd,s_dxd", "channel-last"),
])
def test_kernels_compile_for_sm90(kernel, unit_strides, layout):
    """Every autotune config of each kernel (the backward: of each layout) compiles to an sm_90
    binary (no GPU needed: Triton cross-compiles with its bundled ptxas), bf16 in and out, width 4,
    every feature on: the GPU pipeline runs passes the interpreter never does (layouts of the
    time-contiguous backward's splits and joins, register allocation of the unrolled steps)."""
    assert_script_compiles_for_sm90(SM90_COMPILE, kernel, unit_strides, *([layout] if layout else []))
