"""The Mamba and Mamba-2 blocks run end to end through the Triton kernels (interpreter on CPU).

On a GPU ``backend="auto"`` picks Triton, so the blocks hand the kernels their real layouts:
in_proj slices as transposed (channel-last) views, the conv's output read back without a copy,
strided cotangents in the backward. Here ``auto`` is pointed at Triton and a block's outputs,
final states and every parameter/input gradient are compared with the same block on the
chunked PyTorch path.
"""

from __future__ import annotations

import pytest
import torch

import streamssm.kernels as kernels
from streamssm.layers import Mamba2Block, MambaBlock
from streamssm.models import ArchConfig
from streamssm.testing import assert_close

BLOCKS = {
    "mamba": lambda: MambaBlock(ArchConfig(block="mamba", d_model=8, d_state=4, d_conv=4)),
    "mamba2": lambda: Mamba2Block(ArchConfig(d_model=8, d_state=4, d_conv=3, headdim=4, chunk_size=8)),
}


def run_block(block: torch.nn.Module, u: torch.Tensor, state) -> tuple[torch.Tensor, tuple, dict]:
    """Outputs, final state and gradients of (y * dy).sum() + (final states * d).sum()."""
    u = u.detach().clone().requires_grad_()
    y, new_state = block(u, state)
    g = torch.Generator().manual_seed(3)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g)).sum() for s in new_state)
    params = dict(block.named_parameters())
    grads = torch.autograd.grad(loss, [u, *params.values()])
    return y, tuple(new_state), dict(zip(["u", *params], grads))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_through_triton_kernels_equals_torch_path(name, monkeypatch):
    torch.manual_seed(0)
    block = BLOCKS[name]()
    u = torch.randn(2, 21, 8)
    state = block.init_state(2)
    state = type(state)(*(torch.randn_like(s) * 0.3 for s in state))  # carried state in
    want = run_block(block, u, state)
    resolve, used = kernels.choose_backend, set()

    def to_triton(op, backend, device):
        choice = resolve(op, "triton" if backend == "auto" else backend, device)
        used.add((op, choice))
        return choice

    monkeypatch.setattr(kernels, "choose_backend", to_triton)
    got = run_block(block, u, state)
    scan = "selective_scan" if name == "mamba" else "ssd_scan"
    assert {("causal_conv1d", "triton"), (scan, "triton")} <= used, used
    assert_close(f"{name} y", want[0], got[0], torch.float32)
    for i, (s_want, s_got) in enumerate(zip(want[1], got[1])):
        assert_close(f"{name} final state {i}", s_want, s_got, torch.float32)
    for key in want[2]:
        assert_close(f"{name} d{key}", want[2][key], got[2][key], torch.float32)


def test_mamba2_serving_forward_through_triton_kernels_equals_torch_path(monkeypatch):
    """Without gradients (the service's chunked forward) the Mamba-2 block also runs the gated norm
    kernel, and the conv's channel-last forward writes the final conv state itself."""
    import streamssm.kernels.norm as norm_kernels

    torch.manual_seed(1)
    block = Mamba2Block(ArchConfig(d_model=16, d_state=8, d_conv=4, headdim=8, chunk_size=8, norm_groups=2))
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        u = torch.randn(3, 19, 16)
        state = type(block.init_state(3))(*(torch.randn_like(s) * 0.3 for s in block.init_state(3)))
        want = block(u, state)
        used = set()
        for module in (kernels, norm_kernels):
            resolve = module.choose_backend

            def to_triton(op, backend, device, resolve=resolve):
                choice = resolve(op, "triton" if backend == "auto" else backend, device)
                used.add((op, choice))
                return choice

            monkeypatch.setattr(module, "choose_backend", to_triton)
        got = block(u, state)
    assert {("causal_conv1d", "triton"), ("ssd_scan", "triton"), ("gated_rms_norm", "triton")} <= used, used
    assert_close("mamba2 serving y", want[0], got[0], torch.float32)
    for i, (s_want, s_got) in enumerate(zip(want[1], got[1])):
        assert_close(f"mamba2 serving final state {i}", s_want, s_got, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mamba2_without_state_equals_zero_state(backend, monkeypatch):
    """state None (training, a stream's first call): the kernels start from zeros themselves,
    as from an explicit zero state; the Backbone hands each block None."""
    from streamssm.models import ModelConfig, SSMModel

    if backend == "triton":
        resolve = kernels.choose_backend
        monkeypatch.setattr(kernels, "choose_backend", lambda op, b, device: resolve(op, "triton", device))
    torch.manual_seed(2)
    model = SSMModel(ModelConfig(block="mamba2", d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8,
                                 vocab_size=5)).eval()
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        got, got_state = model.backbone(x)
        want, want_state = model.backbone(x, model.backbone.init_state(2))
    assert_close("features", want, got, torch.float32)
    for g_layer, w_layer in zip(got_state, want_state):
        for g, w in zip(g_layer, w_layer):
            assert_close("state", w, g, torch.float32)
