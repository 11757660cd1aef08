"""Triton selective scan (Mamba-1) against the sequential reference: outputs, final state, grads.

CPU cases run the kernels in Triton's interpreter (fp32, tiny shapes); ``gpu`` cases run on CUDA.
Every case backpropagates (y * dy).sum() + (final * dfinal).sum() so the final-state path is covered.
"""

from __future__ import annotations

import pytest
import torch
import triton

from streamssm.errors import ConfigError, ShapeError
from streamssm.kernels import selective_scan
from streamssm.kernels.mamba1 import scan
from streamssm.kernels.mamba1.reference import selective_scan_ref
from streamssm.kernels.mamba1.scan import selective_scan_triton
from streamssm.testing import assert_close, assert_script_compiles_for_sm90

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b, d, l, n, groups=None, z=True, D=True, bias=True, h0=True,
                dtype=torch.float32, device="cpu", seed=0):
    """Random inputs shaped as in DESIGN §2; dict name -> leaf tensor (None when absent)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt).requires_grad_()

    bc = (b, n, l) if groups is None else (b, groups, n, l)
    f32 = torch.float32
    return dict(
        u=rnd(b, d, l),
        delta=rnd(b, d, l, scale=0.5, shift=-1.0),
        A=(-torch.rand(d, n, generator=g) * 3 - 0.1).to(device).requires_grad_(),
        B=rnd(*bc),
        C=rnd(*bc),
        D=rnd(d, dt=f32) if D else None,
        z=rnd(b, d, l) if z else None,
        delta_bias=rnd(d, scale=0.3, dt=f32) if bias else None,
        initial_state=rnd(b, d, n, dt=f32) if h0 else None,
    )


def run(fn, inputs, softplus=True, seed=1, **kw):
    """Returns (y, final, grads by name) for loss (y*dy).sum() + (final*dfinal).sum()."""
    y, final = fn(**inputs, delta_softplus=softplus, return_final_state=True, **kw)
    g = torch.Generator(device="cpu").manual_seed(seed)
    # cotangents exactly representable in bf16, so every path sees the same ones
    dy = torch.randn(y.shape, generator=g).bfloat16().to(y)
    dfinal = torch.randn(final.shape, generator=g).bfloat16().to(final)
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


def check_against_reference(inputs, dtype=torch.float32, softplus=True, **kw):
    ours = run(lambda **a: selective_scan(**a, backend="triton"), inputs, softplus, **kw) if not kw else \
        run(selective_scan_triton, inputs, softplus, **kw)
    ref_inputs = {k: (None if v is None else v.detach().double().requires_grad_()) for k, v in inputs.items()}
    ref = run(selective_scan_ref, ref_inputs, softplus)
    assert_close("y", ref[0], ours[0], dtype)
    assert_close("final_state", ref[1], ours[1], dtype)
    for name in ours[2]:
        assert_close(f"d{name}", ref[2][name], ours[2][name], dtype)


CASES = {
    # id: (b, d, l, n, groups, z, D, bias, h0, softplus)
    "B2-D8-L33-N4-z-D-bias-h0": (2, 8, 33, 4, None, True, True, True, True, True),
    "B1-D4-L1-N3-plain": (1, 4, 1, 3, None, False, False, False, False, False),
    "B1-D6-L7-N5-D-h0": (1, 6, 7, 5, None, False, True, False, True, True),
    "B2-D8-L17-N4-G2-z": (2, 8, 17, 4, 2, True, False, False, True, True),
    "B1-D6-L16-N2-G3-bias": (1, 6, 16, 2, 3, False, True, True, False, False),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case):
    b, d, l, n, groups, z, D, bias, h0, softplus = CASES[case]
    check_against_reference(make_inputs(b, d, l, n, groups, z, D, bias, h0), softplus=softplus)


@pytest.mark.parametrize("segments", [2, 3])
def test_time_segments_match_reference(segments):
    """Several programs per sequence (segment-state pass and adjoint pass) == reference."""
    check_against_reference(make_inputs(1, 4, 50, 3, seed=3), segments=segments)


@pytest.mark.parametrize("segments", [1, 2])
def test_half_precision_inputs_match_reference(segments):
    """16-bit u/delta/z: the forward walks 8 steps per tile (fp32: 4), over several tiles per chunk."""
    inputs = make_inputs(2, 4, 45, 3, dtype=torch.float16, seed=13)
    check_against_reference(inputs, dtype=torch.float16, segments=segments, chunk=16)


def _force_channel_block(monkeypatch, block_d: int) -> None:
    """Both walking kernels run with BLOCK_D = block_d (one warp), as if the autotuner had picked it."""
    config = [triton.Config({"BLOCK_D": block_d}, num_warps=1, num_stages=1)]
    monkeypatch.setattr(scan._selective_scan_fwd_kernel, "configs", config)
    monkeypatch.setattr(scan._selective_scan_bwd_kernel, "configs", config)


@pytest.mark.parametrize("block_d, dtype", [(16, torch.float32), (8, torch.float32), (16, torch.float16)])
def test_narrow_channel_blocks_match_reference(block_d, dtype, monkeypatch):
    """The autotuner's BLOCK_D 16 / 8 configs (2 / 4 threads per channel on the GPU), forward and
    backward, with 4-step reverse tiles inside 4-step (fp32) and 8-step (16-bit) walk tiles:
    channels per group no multiple of the block, two groups, two time segments, a length no
    multiple of the tiles."""
    _force_channel_block(monkeypatch, block_d)
    check_against_reference(make_inputs(2, 20, 37, 4, groups=2, dtype=dtype, seed=21), dtype=dtype, segments=2,
                            chunk=16)


@pytest.mark.parametrize("chunk", [2, 4])
def test_short_chunks_match_reference(chunk):
    """Chunks of 2 and 4 steps: the walk tile is the whole chunk, the reverse tile 2 steps (chunk 2:
    shorter than the usual 4, which would not fit in the walk's tiles) or the whole chunk (4)."""
    assert scan._reverse_tile(scan._tile(chunk, torch.empty(0))) == chunk
    check_against_reference(make_inputs(2, 6, 19, 3, seed=23), segments=2, chunk=chunk)


def test_chunked_calls_carrying_state_equal_one_call():
    inputs = make_inputs(2, 4, 40, 3, z=True, seed=5)
    y_full, h_full, g_full = run(lambda **a: selective_scan(**a, backend="triton"), inputs)

    def chunked(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_final_state):
        h, ys = initial_state, []
        for s, e in ((0, 17), (17, 18), (18, 40)):
            y, h = selective_scan(u[..., s:e], delta[..., s:e], A, B[..., s:e], C[..., s:e], D, z[..., s:e],
                                  delta_bias, delta_softplus, h, True, backend="triton")
            ys.append(y)
        return torch.cat(ys, dim=-1), h

    y_ch, h_ch, g_ch = run(chunked, inputs)
    assert_close("chunked y", y_full, y_ch, rtol=1e-5, atol=1e-5)
    assert_close("chunked final_state", h_full, h_ch, rtol=1e-5, atol=1e-5)
    for name in g_full:
        assert_close(f"chunked d{name}", g_full[name], g_ch[name], rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs():
    b, d, l, n = 2, 4, 20, 3
    base = make_inputs(b, d, l, n, seed=7)
    g = torch.Generator().manual_seed(8)
    # (b, l, d) / (b, l, n) storage viewed as (b, d, l) / (b, n, l): time is not the last stride
    inputs = dict(base)
    for name in ("u", "delta", "z"):
        inputs[name] = base[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for name in ("B", "C"):
        inputs[name] = torch.randn(b, l, n, generator=g).transpose(1, 2).requires_grad_()
    inputs["A"] = base["A"].detach().t().contiguous().t().requires_grad_()
    assert not inputs["u"].is_contiguous() and not inputs["B"].is_contiguous()
    check_against_reference(inputs)


def test_no_grad_forward_matches_reference():
    inputs = make_inputs(1, 4, 19, 3, seed=9)
    with torch.no_grad():
        y, h = selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend="triton")
        y_ref, h_ref = selective_scan_ref(**inputs, delta_softplus=True, return_final_state=True)
    assert_close("y", y_ref, y)
    assert_close("final_state", h_ref, h)


def test_gradient_through_the_final_state_only():
    """y unused: its gradient reaches the backward as None (no zeros materialized) and the
    backward starts from zeros itself."""
    inputs = make_inputs(1, 6, 21, 4, z=False, seed=3)
    grads = {}
    for name, fn in (("reference", selective_scan_ref), ("triton", lambda **a: selective_scan(**a, backend="triton"))):
        leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in inputs.items()}
        _, final = fn(**leaves, delta_softplus=True, return_final_state=True)
        used = {k: v for k, v in leaves.items() if v is not None and k not in ("C", "D")}  # C, D only read y
        grads[name] = dict(zip(used, torch.autograd.grad((final * torch.linspace(-1, 1, final.numel()).view(
            final.shape)).sum(), list(used.values()))))
    for k, ref in grads["reference"].items():
        assert_close(f"d{k}", ref, grads["triton"][k])


def test_forward_backward_peak_memory_without_zero_checkpoint_gradients():
    """The kept chunk-start states (b, l/chunk, d, n) fp32 are an output of the forward op that
    gets no gradient: autograd handed the backward zeros of them (and of the unused final state),
    alive through the whole backward. Here (n = the interpreter's chunk, 16) they are as large as
    u: the peak of one fwd+bwd was 8.95 x u's bytes with them and 7.89 x without; 7.64 x with the
    scratch of tile states sized for 4-step reverse tiles instead of 2."""
    from streamssm.kernels.mamba1.scan import CHUNK_INTERPRET
    from streamssm.testing import peak_bytes_allocated

    b, d, l, n = 1, 32, 256, CHUNK_INTERPRET
    inputs = make_inputs(b, d, l, n, z=False, h0=False)
    leaves = [v for v in inputs.values() if v is not None]
    dy = torch.randn(b, d, l)

    def step():
        y = selective_scan(**inputs, delta_softplus=True, backend="triton")
        torch.autograd.grad(y, leaves, dy)

    step()
    u_bytes = b * d * l * 4
    peak = peak_bytes_allocated(step, *leaves, dy)
    assert peak <= 7.77 * u_bytes, f"peak {peak / u_bytes:.2f} x u's bytes"


@pytest.mark.parametrize("bad, message", [
    (dict(A=torch.randn(5, 3)), "A must have shape"),
    (dict(A=-torch.rand(4, 3, dtype=torch.float64)), "A must have dtype"),
    (dict(B=torch.randn(1, 3, 3, 8)), "B groups"),
    (dict(initial_state=torch.zeros(1, 4, 2)), "initial_state must have shape"),
    (dict(delta=torch.randn(1, 4, 7)), "delta must have shape"),
])
def test_bad_input_raises_shape_error(bad, message):
    inputs = {k: (None if v is None else v.detach()) for k, v in make_inputs(1, 4, 8, 3).items()}
    inputs.update(bad)
    with pytest.raises(ShapeError, match=message):
        selective_scan(**inputs, backend="triton")


def test_default_chunk_length_grows_for_long_sequences(monkeypatch):
    """On the GPU T is 64, and 256 from CHUNK_LONG_FROM steps (measured faster and smaller at M2/M3,
    slower at M1: scan.py); a given chunk is kept; the interpreter's small T regardless of length."""
    assert scan._chunk_len(None, 10**6) == scan.CHUNK_INTERPRET  # the interpreter (CI)
    monkeypatch.setattr(scan, "interpreting", lambda: False)
    assert [scan._chunk_len(None, l) for l in (1, 4096, 16383, 16384, 2**20)] == [64, 64, 64, 256, 256]
    assert scan._chunk_len(128, 2**20) == 128
    with pytest.raises(ConfigError, match="power of two"):
        scan._chunk_len(96, 10)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, segments, chunk", [(torch.float32, None, None), (torch.bfloat16, 4, 32)],
                         ids=["fp32-auto", "bf16-seg4-T32"])
def test_gpu_realistic_sizes(dtype, segments, chunk):
    """b2 d256 l1000 n16, groups 2, z, D, bias, h0: kernel vs the reference on the same inputs."""
    inputs = make_inputs(2, 256, 1000, 16, groups=2, dtype=dtype, device="cuda", seed=11)
    check_against_reference(inputs, dtype=dtype, segments=segments, chunk=chunk)


@pytest.mark.gpu
def test_gpu_long_sequence_default_chunk():
    """A sequence of CHUNK_LONG_FROM steps takes the long chunk (256) by default: vs the reference."""
    inputs = make_inputs(1, 64, scan.CHUNK_LONG_FROM, 16, dtype=torch.bfloat16, device="cuda", seed=12)
    assert scan._chunk_len(None, scan.CHUNK_LONG_FROM) == scan.CHUNK_LONG
    check_against_reference(inputs, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("block_d", [32, 16, 8])
def test_gpu_each_channel_block_matches_reference(block_d, monkeypatch):
    """Every BLOCK_D the autotuner may pick, on the GPU, where it changes how threads share a channel."""
    _force_channel_block(monkeypatch, block_d)
    inputs = make_inputs(2, 96, 300, 16, groups=2, device="cuda", seed=14)
    check_against_reference(inputs, segments=2)


@pytest.mark.gpu
def test_gpu_bf16_error_within_twice_reference_error():
    """In bf16 our error vs fp64 is at most 2x the fp32-reference-on-bf16-inputs error (+ rounding)."""
    inputs = make_inputs(2, 128, 777, 16, dtype=torch.bfloat16, device="cuda", seed=12)
    y, h, _ = run(selective_scan_triton, inputs)
    ref = run(selective_scan_ref, {k: (None if v is None else v.detach().double().requires_grad_())
                                   for k, v in inputs.items()})
    own = run(selective_scan_ref, inputs)  # reference computed from the same bf16 inputs
    for name, ours, exact, refb in (("y", y, ref[0], own[0]), ("final", h, ref[1], own[1])):
        err = (ours.double() - exact).norm() / exact.norm()
        ref_err = (refb.double() - exact).norm() / exact.norm()
        assert err <= 2 * ref_err + 1e-5, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e}"


SM90_COMPILE = """
import triton
from streamssm.kernels.mamba1 import scan
from streamssm.testing import compile_for_sm90

half = {"p_u", "p_delta", "p_z", "p_y", "p_du", "p_ddelta", "p_dz", "p_dy"}
base = dict(HAS_D=True, HAS_Z=False, HAS_BIAS=True, SOFTPLUS=True, T=64, TT=8, N_PAD=16, BLOCK_D=32,
            s_ul=1, s_dl=1, s_zl=1, s_An=1)
for kernel, meta, prefetch in (
        (scan._selective_scan_fwd_kernel, dict(STATE_ONLY=False, STORE_CKPT=True), True),
        (scan._selective_scan_bwd_kernel, dict(TB=2, PF_AHEAD=scan.BWD_PREFETCH_TILES), True),
        # the kernels of long sequences (several segments per channel), no prefetch of their own
        (scan._selective_scan_adjoint_state_kernel, {}, False),
        (scan._selective_scan_state_passing_kernel, dict(REVERSE=True), False)):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the JITFunction
    binary = compile_for_sm90(fn, {**base, **meta}, lambda a: "*bf16" if a in half else "*fp32", 1)
    assert ("prefetch.global.L1" in binary.asm["ptx"]) == prefetch, fn.__name__
"""


def test_kernels_compile_for_sm90_with_l1_prefetch():
    """Every scan kernel compiles to an sm_90 binary, forward and backward with their B/C row prefetches in the PTX
    (no GPU needed: Triton cross-compiles with its bundled ptxas). The interpreter leaves the
    inline-PTX prefetch out, so only this checks it."""
    assert_script_compiles_for_sm90(SM90_COMPILE)
