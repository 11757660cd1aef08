"""Peer code for side-by-side benchmarks, imported from the git-ignored ``.peers/`` folder.

mamba-ssm's package ``__init__`` imports its CUDA extensions, so its Triton modules are
imported under a bare (stubbed) package. ``PeerMamba2Model`` stacks mamba-ssm's ``Mamba2``
modules into the same model as ours (``streamssm.models.SSMModel``): input encoder, layers of
x + Mamba2(RMSNorm(x)), final RMSNorm, linear head. Without the ``causal_conv1d`` package its
``Mamba2`` runs the conv with ``nn.Conv1d`` and the scan with its Triton
``mamba_chunk_scan_combined`` (``use_mem_eff_path=False``: the fused path needs causal_conv1d);
its ``step`` uses its Triton ``selective_state_update``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

PEERS = Path(__file__).resolve().parent.parent / ".peers"


def stub_package(name: str, path: Path, **attrs) -> None:
    """Make ``name`` importable as a bare package at ``path`` without running its __init__."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def import_mamba_ssm() -> Path:
    """Put the unpacked mamba-ssm sdist on sys.path under a stubbed package; returns its root."""
    src = next(PEERS.glob("mamba_ssm-*"))
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    if "mamba_ssm" not in sys.modules:
        stub_package("mamba_ssm", src / "mamba_ssm")  # its __init__ imports the CUDA extension
    try:
        import huggingface_hub  # noqa: F401  (Mamba2 mixes in its hub class; unused here)
    except ImportError:
        sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {}))
    return src


def mamba2_module() -> type[nn.Module]:
    """mamba-ssm's ``Mamba2`` class."""
    import_mamba_ssm()
    from mamba_ssm.modules.mamba2 import Mamba2

    return Mamba2


def mamba3_siso_combined():
    """mamba-ssm's Triton Mamba-3 (SISO) scan with its autograd: ``mamba3_siso_combined(Q, K, V,
    ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, ..., chunk_size)`` (Q = C, K = B, V = x)."""
    import_mamba_ssm()
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined as fn

    return fn


class PeerMamba2Model(nn.Module):
    """The model of ``ModelConfig(block="mamba2", ...)`` built from mamba-ssm ``Mamba2`` modules.

    ``vocab_size`` > 0: token input (b, l) long; else continuous input (b, l, input_dim).
    Output (b, l, output_dim).
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int, headdim: int, expand: int = 2,
                 d_conv: int = 4, chunk_size: int = 256, vocab_size: int = 0, input_dim: int = 1,
                 output_dim: int = 1, norm_eps: float = 1e-5):
        super().__init__()
        Mamba2 = mamba2_module()
        self.encoder = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(input_dim, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=norm_eps) for _ in range(n_layers))
        self.mixers = nn.ModuleList(
            Mamba2(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, chunk_size=chunk_size,
                   use_mem_eff_path=False, layer_idx=i)
            for i in range(n_layers)
        )
        self.norm_f = nn.RMSNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, output_dim)

    @torch.no_grad()
    def load_from(self, ours: nn.Module) -> PeerMamba2Model:
        """Copy the weights of our ``SSMModel`` of the same configuration (same math, same outputs)."""
        src = ours.state_dict()
        for name, t in self.state_dict().items():
            part, rest = name.split(".", 1)
            if part == "norms":
                key = "backbone.layers.{}.norm.{}".format(*rest.split(".", 1))
            elif part == "mixers":
                index, rest = rest.split(".", 1)
                key = f"backbone.layers.{index}.mixer." + rest.replace("conv1d.", "conv_")
            else:
                key = "backbone." + name if part == "norm_f" else name
            t.copy_(src[key].reshape(t.shape))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm_f(h))

    def init_states(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (conv_state in the weights' dtype, ssm_state fp32 as ours), zeros, made by
        ``Mamba2.allocate_inference_cache``."""
        states = [m.allocate_inference_cache(batch, 1) for m in self.mixers]
        return [(conv, ssm.float()) for conv, ssm in states]

    def step(self, x_t: torch.Tensor, states: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One step of every stream: x_t (b,) tokens or (b, input_dim) values -> (b, output_dim);
        the states are updated in place (``Mamba2.step``)."""
        h = self.encoder(x_t).unsqueeze(1)  # (b, 1, d)
        for norm, mixer, (conv_state, ssm_state) in zip(self.norms, self.mixers, states):
            y, _, _ = mixer.step(norm(h), conv_state, ssm_state)
            h = h + y
        return self.head(self.norm_f(h[:, 0]))
