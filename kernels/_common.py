"""Shared guards and helpers for the kernels: input validation, backend choice, autotune configs."""

from __future__ import annotations

import logging
import os
from typing import Literal, Sequence

import torch

from streamssm.errors import ConfigError, ShapeError

#: ``auto``: Triton on CUDA, ``torch`` on CPU; ``triton``: the Triton kernels (CUDA, or CPU under
#: ``TRITON_INTERPRET=1``); ``torch``: the chunked pure-PyTorch paths (any device);
#: ``reference``: the sequential references (the spec; slow).
Backend = Literal["auto", "triton", "torch", "reference"]
Resolved = Literal["triton", "torch", "reference"]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

log = logging.getLogger(__name__)
_logged_choices: set[tuple[str, str]] = set()  # (backend, device type) already logged


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors (None: absent) records gradients: the forward-only kernels
    (Triton inference paths, the C kernels of the CPU) step aside then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or interpreting()


def choose_backend(op: str, backend: Backend, device: torch.device) -> Resolved:
    """Resolve ``backend`` for a call on ``device``.

    ``auto`` picks Triton on CUDA and the chunked PyTorch path (``torch``) elsewhere (kernel
    tests ask for ``triton`` explicitly under ``TRITON_INTERPRET=1``). Asking for ``triton``
    where it cannot run raises instead of silently falling back.
    """
    if backend == "auto":
        choice: Resolved = "triton" if device.type == "cuda" else "torch"
        if not torch.compiler.is_compiling() and (choice, device.type) not in _logged_choices:  # not traced code
            _logged_choices.add((choice, device.type))  # once a process and device, not once an op
            log.info("kernels: using the %s backend on %s (first op: %s)", choice, device.type, op)
        return choice
    if backend == "triton":
        if not triton_can_run(device):
            raise ConfigError(
                f"{op}: backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1, got device {device}"
            )
        return "triton"
    if backend in ("torch", "reference"):
        return backend
    raise ConfigError(f"{op}: backend must be 'auto', 'triton', 'torch' or 'reference', got {backend!r}")


#: set to ``0`` before the kernels are imported: every Triton kernel keeps only the first config of its
#: list, so a GPU run compiles one config per kernel and key instead of autotuning them all (the GPU
#: correctness tests: cold autotuning at each test shape took 150-320 s of a 600 s device call)
AUTOTUNE_ENV = "STREAMSSM_AUTOTUNE"


def autotune_configs(configs: Sequence, interpret_config=None) -> list:
    """The autotune config list; a single config when interpreting (the interpreter cannot tune):
    ``interpret_config``, or the first; the first where ``STREAMSSM_AUTOTUNE=0``."""
    if interpreting():
        return [interpret_config if interpret_config is not None else configs[0]]
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return [configs[0]]
    return list(configs)


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor | None,
    shape: Sequence[int | None],
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: torch.device | None = None,
    optional: bool = False,
) -> None:
    """Raise ``ShapeError`` naming ``name`` unless ``t`` has ``shape`` (None = any size)."""
    if t is None:
        if optional:
            return
        raise ShapeError(f"{op}: {name} is required")
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
        # the message only on failure: str() of a traced symbolic size breaks torch.compile's graph
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ShapeError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ShapeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ShapeError(f"{op}: {name} is on {t.device}, expected {device} like the other inputs")


def check_positive_length(op: str, name: str, length: int) -> None:
    if length <= 0:
        raise ShapeError(f"{op}: {name} has length 0; feed at least one time step")


def check_divisible(op: str, what: str, total: int, groups: int) -> None:
    if groups <= 0 or total % groups != 0:
        raise ShapeError(f"{op}: {what}: {total} is not divisible by the number of groups {groups}")


def pool_rows(op: str, pool: torch.Tensor, batch: int, state_indices: torch.Tensor | None) -> torch.Tensor:
    """The pool rows (batch,) int64 a step updates: ``state_indices``, or 0..batch-1 when the
    pool holds exactly one row per batch element."""
    if state_indices is None:
        if pool.shape[0] != batch:
            raise ShapeError(f"{op}: state has {pool.shape[0]} rows but the input batch is {batch}; pass state_indices")
        return torch.arange(batch, device=pool.device)
    check_tensor(op, "state_indices", state_indices, (batch,), INDEX_DTYPES, device=pool.device)
    return state_indices.long()
