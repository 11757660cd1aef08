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


def tiny_model(arch: str, device: str = "cpu") -> SSMModel:
    cfg = ModelConfig(d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8, vocab_size=5, **ARCHS[arch])
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


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_training_and_step_match_eager():
    model = tiny_model("mamba2")
    x = torch.randint(0, 5, (2, 11))
    state = random_state(model, 2)
    eager = train_step(model, x, state)
    assert_same_run(eager, train_step(model, x, state, torch.compile(model, fullgraph=True, backend="inductor")))
    with torch.no_grad():
        y0, _ = model.step(x[:, 0], state)
        y1, _ = torch.compile(model.step, fullgraph=True, backend="inductor")(x[:, 0], state)
    assert_close("inductor step", y0, y1, torch.float32)
