"""torch.compile(fullgraph=True) over the models: training fwd+bwd and the recurrent step.

fullgraph=True fails on any graph break, so these tests also guard against breaks creeping back
(logging in traced code, ``.item()``, data-dependent Python branches). CPU tests trace the
"torch" backend with the fast "aot_eager" backend (inductor once, when a C++ compiler exists);
the Triton paths are registered ``streamssm::`` ops (kernels/library.py), checked with
``torch.library.opcheck`` in the interpreter and compiled end to end on CUDA (``-m gpu``).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import assert_close

ARCHS = {
    "mamba": dict(block="mamba"),
    "mamba2": dict(block="mamba2"),
    "mamba3": dict(block="mamba3"),
    "hybrid": dict(block="mamba2", layer_pattern="ma", attention_heads=2, attention_window=5),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own models: no recompile-limit carry-over between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(arch: str, device: str = "cpu", layers: int = 2) -> SSMModel:
    cfg = ModelConfig(d_model=16, n_layers=layers, d_state=8, headdim=8, chunk_size=8, vocab_size=5, **ARCHS[arch])
    return SSMModel(cfg).to(device)


def random_state(model: SSMModel, batch: int, device: str = "cpu"):
    """A non-zero carried state (attention positions stay integer step counts)."""
    return tuple(
        type(ls)(*(t + 3 if not t.is_floating_point() else torch.randn_like(t) * 0.5 for t in ls))
        for ls in model.init_state(batch, device)
    )


def train_step(model: SSMModel, x: torch.Tensor, state, run=None) -> tuple[torch.Tensor, tuple, dict]:
    """Outputs, final state and every parameter's gradient of one fwd+bwd over ``x`` through
    ``run`` (``model`` itself, or a compiled form of it)."""
    model.zero_grad(set_to_none=True)
    y, new_state = (model if run is None else run)(x, state)
    loss = (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).square().mean()
    loss = loss + sum(t.float().square().mean() for ls in new_state for t in ls if t.is_floating_point())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return y.detach(), tuple(tuple(t.detach() for t in ls) for ls in new_state), grads


def assert_same_run(eager, compiled) -> None:
    (y0, s0, g0), (y1, s1, g1) = eager, compiled
    assert_close("outputs", y0, y1, torch.float32)
    for i, (a, b) in enumerate(zip(s0, s1)):
        for field, ta, tb in zip(("conv", "ssm"), a, b):
            assert_close(f"layer {i} {field} state", ta, tb, torch.float32)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert_close(f"grad {name}", g0[name], g1[name], torch.float32)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_fwd_bwd_compiles_fullgraph(arch):
    """Mamba-1's traced scan (fixed pieces) and the others' chunked paths match eager, and
    gradients too; 13 steps: several chunks of 8 and a short last one."""
    model = tiny_model(arch)
    x = torch.randint(0, 5, (2, 13))
    state = random_state(model, 2)
    eager = train_step(model, x, state)
    compiled = train_step(model, x, state, torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert_same_run(eager, compiled)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_step_and_step_pool_compile_fullgraph(arch):
    model = tiny_model(arch).eval()
    state = random_state(model, 3)
    x_t = torch.randn(3, 16)
    step = torch.compile(model.backbone.step, fullgraph=True, backend="aot_eager")
    step_pool = torch.compile(model.backbone.step_pool, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        y0, s0 = model.backbone.step(x_t, state)
        for _ in range(2):  # the second call runs the cached graph on the advanced state
            y1, s1 = step(x_t, state)
            assert_close("step output", y0, y1, torch.float32)
            for a, b in zip(s0, s1):
                for ta, tb in zip(a, b):
                    assert_close("step state", ta, tb, torch.float32)
        # a pool of 5 rows, rows 4 and 1 (in that order) hold the 2 active streams
        pool_e = random_state(model, 5)
        pool_c = tuple(type(ls)(*(t.clone() for t in ls)) for ls in pool_e)
        rows = torch.tensor([4, 1])
        y0 = model.backbone.step_pool(x_t[:2], pool_e, rows)
        y1 = step_pool(x_t[:2], pool_c, rows)
    assert_close("step_pool output", y0, y1, torch.float32)
    for a, b in zip(pool_e, pool_c):
        for ta, tb in zip(a, b):
            assert_close("pool after step_pool", ta, tb, torch.float32)


def test_model_with_token_check_compiles_and_still_checks_in_eager():
    """The token-range check of SSMModel is a host sync: skipped while tracing (was a graph
    break), kept in eager."""
    from streamssm.errors import ShapeError

    model = tiny_model("mamba2")
    explained = torch._dynamo.explain(model)(torch.randint(0, 5, (1, 4)))
    assert explained.graph_break_count == 0, explained.break_reasons
    with pytest.raises(ShapeError, match="token ids"):
        model(torch.tensor([[0, 7]]))


def test_traced_mamba1_scan_matches_adaptive_pieces_under_huge_decays():
    """The fixed-piece scan (compile/export) equals the eager adaptive-piece scan, gradients
    included, for decays from tiny to far past fp32's exp range (delta*|A| up to ~600)."""
    from streamssm.kernels.mamba1.chunked_torch import _ChunkedScanFn, _scan_fixed_pieces

    b, g, e, n, l = 2, 2, 3, 4, 37
    for scale in (0.05, 3.0, 200.0):
        leaves = [torch.rand(b, g, e, l) * scale, torch.randn(b, g, e, l), -torch.rand(g, e, n, 1) * 3 - 0.01,
                  torch.randn(b, g, n, l), torch.randn(b, g, n, l), torch.randn(b, g, e, n)]
        leaves = [t.double().requires_grad_() for t in leaves]
        y0, h0 = _ChunkedScanFn.apply(*leaves, 16)
        y1, h1 = _scan_fixed_pieces(*leaves, piece=8)
        w_y, w_h = torch.randn_like(y0), torch.randn_like(h0)
        g0 = torch.autograd.grad((y0 * w_y).sum() + (h0 * w_h).sum(), leaves)
        g1 = torch.autograd.grad((y1 * w_y).sum() + (h1 * w_h).sum(), leaves)
        assert_close(f"y scale {scale}", y0, y1, torch.float32)
        assert_close(f"final scale {scale}", h0, h1, torch.float32)
        for name, a, c in zip(("dt", "du", "A", "B", "C", "h0"), g0, g1):
            assert torch.isfinite(c).all(), name
            assert_close(f"grad {name} scale {scale}", a, c, torch.float32)


def test_traced_mamba1_scan_has_no_cumsum_over_its_pieces_decay_matrices():
    """Inductor's C++ backend runs a cumsum as an ATen call: one over the pieces' (t, t) decay
    matrices (piece x the scan's values) was ~30 % of a compiled Mamba training step on CPU
    (issue 19). With fewer pieces than steps per piece, no traced cumsum is larger than the
    per-step log-decays (b, d, n, l)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from streamssm.kernels.mamba1.chunked_torch import _scan_fixed_pieces

    b, g, e, n, l, piece = 1, 1, 4, 3, 32, 8
    leaves = [torch.rand(b, g, e, l), torch.randn(b, g, e, l), -torch.rand(g, e, n, 1), torch.randn(b, g, n, l),
              torch.randn(b, g, n, l), torch.randn(b, g, e, n)]
    graph = make_fx(lambda *t: _scan_fixed_pieces(*t, piece=piece))(*leaves).graph
    sizes = [node.args[0].meta["val"].numel() for node in graph.nodes if node.target == torch.ops.aten.cumsum.default]
    assert sizes and max(sizes) <= b * g * e * n * l, sizes


@pytest.mark.slow  # inductor's C++ compile: minutes on a busy 2-core CPU
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_training_and_step_match_eager():
    model = tiny_model("mamba2", layers=1)
    x = torch.randint(0, 5, (2, 11))
    state = random_state(model, 2)
    eager = train_step(model, x, state)
    assert_same_run(eager, train_step(model, x, state, torch.compile(model, fullgraph=True, backend="inductor")))
    with torch.no_grad():
        y0, _ = model.step(x[:, 0], state)
        y1, _ = torch.compile(model.step, fullgraph=True, backend="inductor")(x[:, 0], state)
    assert_close("inductor step", y0, y1, torch.float32)


# ----------------------------------------------------------------------------- Triton paths as ops


def scan_inputs(requires_grad: bool = True) -> dict[str, dict]:
    """Tiny fp32 inputs of the two scans (odd lengths, several chunks, an initial state)."""
    b, d, n, l = 2, 8, 4, 11
    h, p = 2, 4

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).requires_grad_(requires_grad)

    def negative(*shape):  # A: decays in (-1.5, -0.5)
        return (-torch.rand(*shape) - 0.5).requires_grad_(requires_grad)

    return {
        "selective_scan": dict(u=leaf(b, d, l), delta=leaf(b, d, l, scale=0.5), A=negative(d, n), B=leaf(b, n, l),
                               C=leaf(b, n, l), D=leaf(d), z=leaf(b, d, l), delta_bias=leaf(d, scale=0.1),
                               delta_softplus=True, initial_state=leaf(b, d, n), return_final_state=True),
        "ssd_scan": dict(x=leaf(b, l, h, p), dt=leaf(b, l, h, scale=0.5), A=negative(h),
                         B=leaf(b, l, 1, n), C=leaf(b, l, 1, n), chunk_size=4, D=leaf(h), z=leaf(b, l, h, p),
                         dt_bias=leaf(h, scale=0.1), dt_softplus=True, initial_state=leaf(b, h, p, n),
                         return_final_state=True),
        # x channel-last, as the blocks hand it over (a transposed slice of in_proj's output)
        "causal_conv1d": dict(x=leaf(b, l, d).transpose(1, 2), weight=leaf(d, 4, scale=0.5), bias=leaf(d),
                              initial_state=leaf(b, d, 3), activation="silu", return_final_state=True),
    }


@pytest.mark.parametrize("op_name", ["selective_scan", "ssd_scan", "causal_conv1d"])
def test_triton_scan_op_compiles_fullgraph_in_the_interpreter(op_name):
    """The registered Triton scan (run by Triton's CPU interpreter) inside a fullgraph compile:
    outputs, final state and every input's gradient equal the uncompiled op."""
    import streamssm.kernels as K

    op = getattr(K, op_name)
    kwargs = scan_inputs()[op_name]
    leaves = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}

    def run(fn):
        y, final = fn(**kwargs, backend="triton")
        w = torch.linspace(-1, 1, y.numel()).view(y.shape)
        grads = torch.autograd.grad((y * w).sum() + final.square().sum(), list(leaves.values()))
        return y.detach(), final.detach(), grads

    eager, compiled = run(op), run(torch.compile(op, fullgraph=True, backend="aot_eager"))
    assert_close("y", eager[0], compiled[0], torch.float32)
    assert_close("final", eager[1], compiled[1], torch.float32)
    for name, a, b in zip(leaves, eager[2], compiled[2]):
        assert_close(f"grad {name}", a, b, torch.float32)


def test_triton_step_ops_compile_fullgraph_in_the_interpreter():
    """Backbone.step_pool on the Triton step ops (in-place pool updates declared as mutations)
    compiled fullgraph equals eager, pool included."""
    import streamssm.kernels as K

    model = tiny_model("mamba2").eval()
    pool_e = random_state(model, 4)
    pool_c = tuple(type(ls)(*(t.clone() for t in ls)) for ls in pool_e)
    rows = torch.tensor([3, 0])
    x_t = torch.randn(2, 16)

    def step_pool(x, pool):  # the block's step on the Triton ops, as the service's GPU path runs it
        mixer = model.backbone.layers[0].mixer
        z, xbc, dt = mixer._split(mixer.in_proj(x))
        xbc = K.conv1d_step(xbc, pool.conv, mixer.conv_weight, mixer.conv_bias, state_indices=rows, backend="triton")
        xs, B, C = mixer._split_xbc(xbc)
        return K.ssd_step(pool.ssm, xs, dt, mixer._A(), B, C, D=mixer.D, z=z.reshape(xs.shape),
                          dt_bias=mixer.dt_bias, dt_softplus=True, state_indices=rows, backend="triton")

    with torch.no_grad():
        y0 = step_pool(x_t, pool_e[0])
        y1 = torch.compile(step_pool, fullgraph=True, backend="aot_eager")(x_t, pool_c[0])
    assert_close("step y", y0, y1, torch.float32)
    for name, a, b in zip(("conv", "ssm"), pool_e[0], pool_c[0]):
        assert_close(f"pool {name}", a, b, torch.float32)


@pytest.mark.parametrize("op_name", ["selective_scan", "ssd_scan", "causal_conv1d"])
def test_triton_scan_ops_pass_opcheck(op_name):
    """Schema, fake implementation (shapes/dtypes/strides), autograd registration and AOT
    dispatch of the forward op, checked by torch.library.opcheck in the interpreter."""
    import streamssm.kernels.library as lib

    kw = scan_inputs()[op_name]
    if op_name == "selective_scan":
        B4, C4 = kw["B"].unsqueeze(1), kw["C"].unsqueeze(1)
        args = (kw["u"], kw["delta"], kw["A"], B4, C4, kw["D"], kw["z"], kw["delta_bias"], True,
                kw["initial_state"], True, None, 16)
        op = lib.selective_scan_fwd
    elif op_name == "causal_conv1d":
        args = (kw["x"], kw["weight"], kw["bias"], kw["initial_state"], True)
        op = lib.causal_conv1d_fwd
    else:
        args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["dt_bias"], kw["initial_state"],
                4, True, None, None)
        op = lib.ssd_scan_fwd
        no_grad = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(lib.ssd_scan_infer, no_grad[:9] + no_grad[10:])  # no chunk_size: its own
        input_weight = torch.rand(kw["dt"].shape, requires_grad=True)  # Mamba-3's trapezoid weights
        torch.library.opcheck(op, args[:-1] + (input_weight,))
        torch.library.opcheck(lib.ssd_scan_infer, no_grad[:9] + no_grad[10:-1] + (input_weight.detach(),))
    torch.library.opcheck(op, args)


def test_mamba3_rotary_op_passes_opcheck():
    import streamssm.kernels.library as lib

    b, l, g, h, n = 2, 70, 1, 2, 4  # two tiles
    args = (torch.randn(b, l, g, n, requires_grad=True), torch.randn(b, l, g, n, requires_grad=True),
            torch.rand(b, l, h, requires_grad=True), torch.randn(b, l, g, n // 2, requires_grad=True), torch.float32)
    torch.library.opcheck(lib.mamba3_rotary_fwd, args)


def test_triton_step_ops_pass_opcheck():
    import streamssm.kernels.library as lib

    b, pool, d, n, h, p = 2, 3, 8, 4, 2, 4
    rows = torch.tensor([2, 0])
    torch.library.opcheck(lib.conv1d_step, (torch.randn(b, d), torch.randn(pool, d, 3), torch.randn(d, 4),
                                            torch.randn(d), "silu", rows))
    torch.library.opcheck(lib.selective_scan_step, (torch.randn(pool, d, n), torch.randn(b, d), torch.rand(b, d),
                                                    -torch.rand(d, n), torch.randn(b, n), torch.randn(b, n),
                                                    torch.randn(d), torch.randn(b, d), torch.randn(d), True, rows))
    torch.library.opcheck(lib.ssd_step, (torch.randn(pool, h, p, n), torch.randn(b, h, p), torch.rand(b, h),
                                         -torch.rand(h), torch.randn(b, 1, n), torch.randn(b, 1, n), torch.randn(h),
                                         torch.randn(b, h, p), torch.randn(h), True, rows))
    torch.library.opcheck(lib.mamba3_step, (torch.randn(pool, h, p, n), torch.randn(pool, h * p + n),
                                            torch.randn(b, h, p), torch.rand(b, h), -torch.rand(h),
                                            torch.randn(b, 1, n), torch.randn(b, 1, n), torch.rand(b, h),
                                            torch.randn(b, 1, n // 2), torch.randn(h), torch.randn(b, h, p), rows))


def test_pool_forward_op_passes_opcheck_and_compiles_fullgraph(monkeypatch):
    """ssd_scan_infer_pool (the Streamer's chunked SSD, pool rows updated in place: a declared
    mutation) passes opcheck, and the Mamba-2 block's forward_pool on the Triton ops compiled
    fullgraph equals eager, the pool included."""
    import streamssm.kernels as K
    import streamssm.kernels.library as lib

    b, l, h, p, g, n = 2, 11, 2, 4, 1, 4
    torch.library.opcheck(lib.ssd_scan_infer_pool, (
        torch.randn(b, l, h, p), torch.randn(b, l, h), -torch.rand(h), torch.randn(b, l, g, n),
        torch.randn(b, l, g, n), torch.randn(h), torch.randn(b, l, h, p), torch.randn(h), torch.randn(4, h, p, n),
        torch.tensor([3, 1]), True))
    resolve = K.choose_backend
    monkeypatch.setattr(K, "choose_backend", lambda op, backend, device: resolve(op, "triton", device))
    model = tiny_model("mamba2").eval()
    pool_e = random_state(model, 4)[0]
    pool_c = type(pool_e)(*(t.clone() for t in pool_e))
    mixer = model.backbone.layers[0].mixer
    rows, x = torch.tensor([3, 0]), torch.randn(2, 9, 16)
    before = pool_e.ssm.clone()
    with torch.no_grad():
        y0 = mixer.forward_pool(x, pool_e, rows)
        y1 = torch.compile(mixer.forward_pool, fullgraph=True, backend="aot_eager")(x, pool_c, rows)
    assert_close("forward_pool y", y0, y1, torch.float32)
    for name, a, c in zip(("conv", "ssm"), pool_e, pool_c):
        assert_close(f"pool {name}", a, c, torch.float32)
    assert not torch.equal(pool_e.ssm[rows], before[rows])  # the rows did move


def test_triton_scan_op_exports_as_one_node():
    """torch.export carries the registered op: the exported graph holds one SSD node (not a
    trace of its launches; without gradients the one-pass ssd_scan_infer) and runs to the same
    result."""
    import streamssm.kernels as K

    kw = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in scan_inputs(False)["ssd_scan"].items()}
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}

    class Scan(torch.nn.Module):
        def forward(self, **t):
            return K.ssd_scan(**{**kw, **t}, backend="triton")

    exported = torch.export.export(Scan(), (), tensors)
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert [t for t in targets if t.startswith("streamssm.")] == ["streamssm.ssd_scan_infer.default"], targets
    for name, a, b in zip(("y", "final"), Scan()(**tensors), exported.module()(**tensors)):
        assert_close(name, a, b, torch.float32)


# ----------------------------------------------------------------------------- GPU: Triton ops under inductor


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_inductor_fullgraph_on_triton_kernels(arch):
    """On CUDA the blocks run the registered Triton ops: a fullgraph inductor compile of training
    fwd+bwd, Backbone.step and step_pool equals eager."""
    model = tiny_model(arch, "cuda")
    x = torch.randint(0, 5, (2, 37), device="cuda")
    state = random_state(model, 2, "cuda")
    eager = train_step(model, x, state)
    assert_same_run(eager, train_step(model, x, state, torch.compile(model, fullgraph=True)))
    model.eval()
    x_t = torch.randn(2, 16, device="cuda")
    rows = torch.tensor([3, 0], device="cuda")
    pool_e = random_state(model, 4, "cuda")
    pool_c = tuple(type(ls)(*(t.clone() for t in ls)) for ls in pool_e)
    with torch.no_grad():
        y0, s0 = model.backbone.step(x_t, state)
        y1, s1 = torch.compile(model.backbone.step, fullgraph=True)(x_t, state)
        p0 = model.backbone.step_pool(x_t, pool_e, rows)
        p1 = torch.compile(model.backbone.step_pool, fullgraph=True)(x_t, pool_c, rows)
    assert_close("step", y0, y1, torch.float32)
    assert_close("step_pool", p0, p1, torch.float32)
    for a, b in zip(s0 + pool_e, s1 + pool_c):
        for ta, tb in zip(a, b):
            assert_close("state", ta, tb, torch.float32)
