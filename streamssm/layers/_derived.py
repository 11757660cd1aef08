"""fp32 tensors derived from a block's parameters (A = -exp(A_log), D and dt bias in fp32),
cached between calls while no gradient is being recorded.

Inference (the Streamer's hot path) otherwise pays an exp and up to three casts, each a kernel
launch on a GPU, per layer per call. A cache entry is reused only while every source parameter
is the same storage at the same version: ``load_state_dict`` and optimizer steps update
parameters in place (the version counter moves), ``.to()`` / ``.half()`` swap their storage (the
entry holds a detached view of the old storage, so its address cannot be reused meanwhile).
Writes through ``param.data`` bypass the version counter: they are not seen (use in-place
updates under ``torch.no_grad()``, as ``load_state_dict`` and ``torch.optim`` do). With
gradients enabled and a source requiring grad the value is computed fresh, inside the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from streamssm.kernels._common import needs_grad

_CACHE_ATTR = "_streamssm_fp32_cache"


def cached_fp32(module: nn.Module, key: str, fn: Callable[[], torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
    """``fn()`` (a pure function of ``sources``), reused from ``module``'s cache when valid."""
    if torch.compiler.is_compiling() or needs_grad(*sources):
        return fn()  # compiled: traced into the graph (a few fused ops), no cache lookup to break it
    cache: dict = module.__dict__.setdefault(_CACHE_ATTR, {})
    hit = cache.get(key)
    if hit is not None:
        held, versions, value = hit
        if all(h.data_ptr() == t.data_ptr() and h.dtype == t.dtype and h.device == t.device and v == t._version
               for h, v, t in zip(held, versions, sources)):
            return value
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, also usable outside inference mode
        value = fn()
    cache[key] = (tuple(t.detach() for t in sources), tuple(t._version for t in sources), value)
    return value


class Fp32Params:
    """Mixin for SSM blocks with ``A_log`` (A = -exp(A_log)) and fp32-consumed parameters."""

    A_log: torch.Tensor

    def _A(self) -> torch.Tensor:
        """A = -exp(A_log) in fp32, shape of A_log (cached while no gradient is recorded)."""
        return cached_fp32(self, "A", lambda: -torch.exp(self.A_log.float()), self.A_log)

    def _fp32(self, key: str, p: torch.Tensor) -> torch.Tensor:
        """Parameter ``p`` in fp32: itself when already fp32, else a cached cast."""
        return p if p.dtype == torch.float32 else cached_fp32(self, key, p.float, p)
