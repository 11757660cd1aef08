"""Public ops of streamssm (DESIGN §2) with input validation and backend dispatch.

    selective_scan   Mamba-1 scan          u, delta, z (b, d, l); B, C (b, n, l) | (b, g, n, l)
    ssd_scan         Mamba-2 chunked SSD   x, z (b, l, h, p); dt (b, l, h); B, C (b, l, g, n)
    ssd_scan_pool    ssd_scan from and back into pool rows of states (the Streamer's chunked calls)
    causal_conv1d    depthwise causal conv x (b, d, l); weight (d, w)
    mamba3_scan      Mamba-3 (trapezoid,   x, z (b, l, h, p); dt, lam (b, l, h); B, C (b, l, g, n);
                     rotating state)       theta (b, l, g, n/2)
    add_rms_norm     x + y and RMSNorm of  x, y (b, d); weight (d,)  (the step's layer epilogue)
                     the sum, one pass
    *_step           one time step, updating a state pool in place at ``state_indices``

Backends:
    "triton"     the Triton kernels; on CPU only in Triton's interpreter (``TRITON_INTERPRET=1``,
                 how the tests check them), otherwise it raises
    "torch"      the chunked pure-PyTorch paths (``mamba1/chunked_torch.py``,
                 ``ssd/chunked_torch.py``; conv1d is ``F.conv1d``): the fast CPU path; calls
                 without gradients run C kernels where a C++ compiler builds them
                 (``ssd/scan_cpu.py``, ``mamba1/scan_cpu.py``, fp32 ``conv1d/conv_cpu.py`` and
                 ``norm/norm_cpu.py``; ``cpu_library.py``, ``cpu_math.py``)
    "reference"  the sequential references, the spec (slow)
    "auto"       CUDA tensors -> "triton"; CPU tensors -> "torch"
The one-step ops' "torch" is the in-place CPU steps (``*/step_cpu.py``: the pool's slice
updated in place when the rows are consecutive, else one gather and one scatter); "reference"
and a traced call that takes no C kernel (torch.compile / torch.export fuse the functional
references) run the vectorized single-step references. mamba3_scan's "torch" and "triton" both run
``mamba3/chunked.py`` (B, C rotated per head, then one ssd_scan with input weights on that
backend; the rotation is a Triton op on "triton", ``mamba3_rotary_ref`` on "torch").

torch.compile / torch.export: the Triton paths are registered ``streamssm::`` ops
(``kernels/library.py``), one graph node each; so are the C kernels of "torch" for torch.compile
(``kernels/cpu_ops.py``: the conv and its step, the Mamba-1 scan and step, the SSD scan over pool
rows and its step), called where an eager call takes them, with the pool and its rows in place of
the eager steps' pool slice. The rest of "torch" and "reference" are traced as plain PyTorch (no
host sync, no logging while tracing), and so is everything under torch.export (non-strict, its
default: the ONNX export's graphs hold no custom op).
"""

from __future__ import annotations

import torch

from streamssm.errors import ShapeError
from streamssm.kernels._checks import (
    FP32,
    check_chunk_size,
    check_conv_options,
    check_groups,
    check_mamba1_options,
    check_mamba3,
    check_ssd_options,
)
from streamssm.kernels._common import (
    INDEX_DTYPES,
    Backend,
    check_divisible,
    check_positive_length,
    check_tensor,
    choose_backend,
    needs_grad,
    pool_rows,
)

# ----------------------------------------------------------------------------- Mamba-1 scan


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: Backend = "auto",
):
    """Mamba-1 selective scan (see ``mamba1/reference.py`` for the recurrence).

    u, delta, z: (b, d, l); A: (d, n) fp32; B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,)
    fp32; initial_state: (b, d, n) fp32. Returns y (b, d, l) [, final_state (b, d, n) fp32].
    """
    op = "selective_scan"
    check_tensor(op, "u", u, (None, None, None))
    b, d, l = u.shape
    check_positive_length(op, "u", l)
    check_tensor(op, "delta", delta, (b, d, l), device=u.device)
    check_tensor(op, "A", A, (d, None), FP32, device=u.device)
    n = A.shape[1]
    bc_shape = (b, n, l) if B.dim() == 3 else (b, None, n, l)
    check_tensor(op, "B", B, bc_shape, device=u.device)
    check_groups(op, "B", B, d, 4)
    check_tensor(op, "C", C, (b, n, l) if C.dim() == 3 else (b, None, n, l), device=u.device)
    check_groups(op, "C", C, d, 4)
    check_mamba1_options(op, D, z, delta_bias, (b, d, l), u.device)
    check_tensor(op, "initial_state", initial_state, (b, d, n), FP32, device=u.device, optional=True)
    choice = choose_backend(op, backend, u.device)
    if choice == "triton":
        from streamssm.kernels.mamba1.scan import selective_scan_triton as impl
    elif choice == "torch":
        from streamssm.kernels.mamba1 import scan_cpu

        if scan_cpu.applies(u, B, delta, A, C, D, z, delta_bias, initial_state, traced=True):  # no gradient, CPU: C
            if torch.compiler.is_compiling():  # traced: the kernel's registered op
                from streamssm.kernels.cpu_ops import selective_scan_op as impl
            else:
                impl = scan_cpu.selective_scan_cpu
        else:
            from streamssm.kernels.mamba1.chunked_torch import selective_scan_chunked as impl
    else:
        from streamssm.kernels.mamba1.reference import selective_scan_ref as impl
    return impl(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                initial_state=initial_state, return_final_state=return_final_state)


def cpu_libraries(block: str | None = None) -> list:
    """The ``library()`` functions of the C kernels of the "torch" backend (``ssd/scan_cpu.py``,
    ``mamba1/scan_cpu.py``, ``conv1d/conv_cpu.py``, ``norm/norm_cpu.py``, ``scores_cpu.py``); with
    ``block`` (a model's block type: ``mamba``, ``mamba2``, ``mamba3``) only those its layers call
    (any other or None: all of them)."""
    from streamssm.kernels import scores_cpu
    from streamssm.kernels.conv1d import conv_cpu
    from streamssm.kernels.mamba1 import scan_cpu as selective_scan_cpu
    from streamssm.kernels.norm import norm_cpu
    from streamssm.kernels.ssd import scan_cpu

    mixers = {"mamba": [selective_scan_cpu.library, conv_cpu.library], "mamba2": [scan_cpu.library, conv_cpu.library],
              "mamba3": [scan_cpu.library]}  # Mamba-3 has no short conv
    every_mixer = [scan_cpu.library, selective_scan_cpu.library, conv_cpu.library]
    return mixers.get(block, every_mixer) + [norm_cpu.library, scores_cpu.library]


def load_cpu_kernels(block: str | None = None) -> bool:
    """Build (the first time on a machine, ~1.5 s each) and load the C kernels of
    :func:`cpu_libraries` (those of ``block``'s layers, or all), so that the first call using them
    does not pay for it; True when all are there, False where no C++ compiler builds them (logged)."""
    return all([library() is not None for library in cpu_libraries(block)])


# ----------------------------------------------------------------------------- Mamba-2 SSD


def _check_ssd_scan(op: str, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor, chunk_size: int, D: torch.Tensor | None, z: torch.Tensor | None,
                    dt_bias: torch.Tensor | None, input_weight: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """Validates an SSD scan's inputs (shapes of :func:`ssd_scan`); returns b, l, h, p, n."""
    check_tensor(op, "x", x, (None, None, None, None))
    b, l, h, p = x.shape
    check_positive_length(op, "x", l)
    check_tensor(op, "dt", dt, (b, l, h), device=x.device)
    check_tensor(op, "input_weight", input_weight, (b, l, h), device=x.device, optional=True)
    check_tensor(op, "A", A, (h,), FP32, device=x.device)
    check_tensor(op, "B", B, (b, l, None, None), device=x.device)
    g, n = B.shape[2], B.shape[3]
    check_divisible(op, "heads", h, g)
    check_tensor(op, "C", C, (b, l, g, n), device=x.device)
    check_ssd_options(op, D, z, dt_bias, (b, l, h, p), x.device)
    check_chunk_size(op, chunk_size)
    return b, l, h, p, n


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: Backend = "auto",
    input_weight: torch.Tensor | None = None,
):
    """Mamba-2 SSD scan (see ``ssd/reference.py`` for the recurrence).

    x, z: (b, l, h, p); dt: (b, l, h); A: (h,) fp32; B, C: (b, l, g, n); D: (h,), (h, p) or per
    token (b, l, h) fp32 (the skip y += D x);
    dt_bias: (h,) fp32; initial_state: (b, h, p, n) fp32, or (num_seqs, h, p, n) with
    ``cu_seqlens`` (num_seqs + 1,) int (then b must be 1). ``input_weight`` (b, l, h): the
    weight of x_t B_t^T in the state update in place of dt_t (dt then sets only the decay; the
    trapezoid of Mamba-3 needs it). Returns y (b, l, h, p) [, final_state].

    ``chunk_size`` (tokens per chunk) changes results only by rounding; the "torch" backend ignores
    it for a call that needs no gradient (the sequential C scan, or the chunked one at
    ``ssd/chunked_torch.py: inference_chunk_size``). Its default 256 is the
    API of DESIGN §2 and mamba_ssm's: on the GPU long chunks make the serial state passing
    between chunks cheap. The models' blocks always pass ``ModelConfig.chunk_size`` (64, sized
    for short streaming chunks), so this default serves direct calls only.
    """
    op = "ssd_scan"
    b, l, h, p, n = _check_ssd_scan(op, x, dt, A, B, C, chunk_size, D, z, dt_bias, input_weight)
    rows = b
    if cu_seqlens is not None:
        check_tensor(op, "cu_seqlens", cu_seqlens, (None,), INDEX_DTYPES, device=x.device)
        if b != 1:
            raise ShapeError(f"{op}: packed sequences (cu_seqlens) need batch 1, got batch {b}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != l or any(e < s for s, e in zip(bounds[:-1], bounds[1:])):
            raise ShapeError(f"{op}: cu_seqlens must rise from 0 to the length {l}, got {bounds}")
        rows = len(bounds) - 1
    check_tensor(op, "initial_state", initial_state, (rows, h, p, n), FP32, device=x.device, optional=True)
    return _ssd_scan_impl(choose_backend(op, backend, x.device))(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=initial_state, cu_seqlens=cu_seqlens, return_final_state=return_final_state,
        input_weight=input_weight)


def _ssd_scan_impl(choice: str):
    """The SSD scan of a resolved backend (validated inputs: ``ssd_scan``'s keywords)."""
    if choice == "triton":
        from streamssm.kernels.ssd.combined import ssd_scan_triton as impl
    elif choice == "torch":
        from streamssm.kernels.ssd.chunked_torch import ssd_scan_torch as impl
    else:
        from streamssm.kernels.ssd.reference import ssd_scan_ref as impl
    return impl


def ssd_scan_pool(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_indices: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """:func:`ssd_scan` of b sequences whose states live in a pool; **updates ``ssm_state``
    (pool, h, p, n) fp32 in place**: row ``state_indices[i]`` (default i) is sequence i's initial
    state and receives its final one. Other arguments as :func:`ssd_scan`; returns y (b, l, h, p).

    On "triton" a call that wants no gradient and takes the one-pass forward reads and writes the
    rows inside the kernel (``kernels/library.py: pool_forward_in_kernel``); any other call
    gathers the rows, runs the backend's scan and writes the final states back. Rows must be
    distinct, except a scratch row whose contents nobody reads (padding)."""
    op = "ssd_scan_pool"
    b, l, h, p, n = _check_ssd_scan(op, x, dt, A, B, C, chunk_size, D, z, dt_bias, None)
    check_tensor(op, "ssm_state", ssm_state, (None, h, p, n), FP32, device=x.device)
    rows = pool_rows(op, ssm_state, b, state_indices)
    choice = choose_backend(op, backend, x.device)
    if choice == "triton":
        from streamssm.kernels.library import pool_forward_in_kernel, ssd_scan_infer_pool

        if pool_forward_in_kernel(x, dt, A, B, C, D, z, dt_bias, ssm_state):
            return ssd_scan_infer_pool(x, dt, A, B, C, D, z, dt_bias, ssm_state, rows, bool(dt_softplus))
    if choice == "torch" and (D is None or D.dim() < 3) and ssm_state.is_contiguous():
        from streamssm.kernels.ssd import scan_cpu

        if scan_cpu.applies(ssm_state, x, dt, A, B, C, D, z, dt_bias, traced=True):  # the rows scanned in place, in C
            if torch.compiler.is_compiling():  # traced: the kernel's registered op
                from streamssm.kernels.cpu_ops import ssd_scan_pool_cpu as scan
            else:
                scan = scan_cpu.scan_into
            return scan(ssm_state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), rows=rows).to(x.dtype)
    # validated above: the scan itself, not ssd_scan's checks again (the CPU engine's every call)
    y, final = _ssd_scan_impl(choice)(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus, initial_state=ssm_state.index_select(0, rows),
                                      return_final_state=True)
    _update_pool(ssm_state, rows, final)
    return y


# ----------------------------------------------------------------------------- causal conv1d


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
    backend: Backend = "auto",
):
    """Causal depthwise conv1d. x (b, d, l); weight (d, w), 2 <= w <= 4; bias (d,);
    initial_state (b, d, w-1). Returns y (b, d, l) [, final_state (b, d, w-1)]."""
    op = "causal_conv1d"
    check_tensor(op, "x", x, (None, None, None))
    b, d, l = x.shape
    check_positive_length(op, "x", l)
    check_tensor(op, "weight", weight, (d, None), device=x.device)
    w = weight.shape[1]
    check_conv_options(op, w, activation)
    check_tensor(op, "bias", bias, (d,), device=x.device, optional=True)
    check_tensor(op, "initial_state", initial_state, (b, d, w - 1), device=x.device, optional=True)
    choice = choose_backend(op, backend, x.device)
    if choice == "triton":
        from streamssm.kernels.conv1d.conv import causal_conv1d_triton as impl
    else:
        from streamssm.kernels.conv1d import conv_cpu

        if choice == "torch" and conv_cpu.applies(x, weight, bias, initial_state, traced=True):  # fp32 CPU, no gradient
            if torch.compiler.is_compiling():  # traced: the kernel's registered op
                from streamssm.kernels.cpu_ops import causal_conv1d_op as impl
            else:
                impl = conv_cpu.causal_conv1d_cpu
        else:  # the reference is one F.conv1d call
            from streamssm.kernels.conv1d.reference import causal_conv1d_ref as impl
    return impl(x, weight, bias=bias, initial_state=initial_state, activation=activation,
                return_final_state=return_final_state)


# ----------------------------------------------------------------------------- single steps


def _update_pool(pool: torch.Tensor, rows: torch.Tensor, new_rows: torch.Tensor) -> None:
    pool.index_copy_(0, rows, new_rows.to(pool.dtype))


def _first_of_run(pool: torch.Tensor, rows: torch.Tensor, given: bool) -> int | None:
    """The first row when ``rows`` (b,) are consecutive (s, s+1, ..., s+b-1) inside a contiguous
    pool, so the pool's slice can be updated in place; else None. Checked on host tensors only
    (a device tensor would sync)."""
    if not pool.is_contiguous():
        return None
    if not given:  # pool_rows' default 0..b-1
        return 0
    if rows.device.type != "cpu":
        return None
    b = rows.shape[0]
    values = rows.tolist()
    start = values[0]
    fits = 0 <= start and start + b <= pool.shape[0]
    return start if fits and values == list(range(start, start + b)) else None


def _step_in_place(pool: torch.Tensor, rows: torch.Tensor, given: bool, step) -> torch.Tensor:
    """Runs ``step(block)``, which updates ``block`` (the pool's rows ``rows``) in place and
    returns y: on the pool's slice when the rows are consecutive, else on one gathered copy
    scattered back once."""
    start = _first_of_run(pool, rows, given)
    if start is not None:
        return step(pool[start:start + rows.shape[0]])
    block = pool.index_select(0, rows)
    y = step(block)
    _update_pool(pool, rows, block)
    return y


def _use_reference(backend: Backend) -> bool:
    """The one-step ops' "reference" backend, and any traced call that takes no C kernel's op
    (torch.compile / export: the functional reference is what those graphs fuse), run the
    references; else the CPU steps."""
    return backend == "reference" or torch.compiler.is_compiling()


def conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    state_indices: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """One conv step; **updates ``conv_state`` (pool, d, w-1) in place** at ``state_indices``.

    x (b, d); weight (d, w); state_indices (b,) int rows of the pool (default 0..b-1).
    Returns y (b, d)."""
    op = "conv1d_step"
    check_tensor(op, "x", x, (None, None))
    b, d = x.shape
    check_tensor(op, "weight", weight, (d, None), device=x.device)
    check_conv_options(op, weight.shape[1], activation)
    check_tensor(op, "bias", bias, (d,), device=x.device, optional=True)
    check_tensor(op, "conv_state", conv_state, (None, d, weight.shape[1] - 1), device=x.device)
    rows = pool_rows(op, conv_state, b, state_indices)
    if choose_backend(op, backend, x.device) == "triton":
        if torch.compiler.is_compiling():  # the registered op: one graph node, its pool mutation declared
            from streamssm.kernels.library import conv1d_step as impl
        else:  # the launcher (same arguments): an op's Python dispatch costs several step kernels
            from streamssm.kernels.conv1d.step import conv1d_step_triton as impl
        return impl(x, conv_state, weight, bias, activation, rows)
    if backend != "reference" and torch.compiler.is_compiling():
        from streamssm.kernels.conv1d import conv_cpu

        if conv_cpu.step_applies(conv_state, x, weight, bias, traced=True):  # traced: the C step's op
            from streamssm.kernels.cpu_ops import conv1d_step_cpu

            return conv1d_step_cpu(x, conv_state, weight, bias, activation, rows)
    if _use_reference(backend):
        from streamssm.kernels.conv1d.reference import conv1d_step_ref

        y, new = conv1d_step_ref(conv_state.index_select(0, rows), x, weight, bias, activation)
        _update_pool(conv_state, rows, new)
        return y
    from streamssm.kernels.conv1d.step_cpu import conv1d_step_cpu

    return _step_in_place(conv_state, rows, state_indices is not None,
                          lambda block: conv1d_step_cpu(block, x, weight, bias, activation))


def selective_scan_step(
    ssm_state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    state_indices: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """One Mamba-1 step; **updates ``ssm_state`` (pool, d, n) fp32 in place** at ``state_indices``.

    u, delta, z (b, d); B, C (b, n) or (b, g, n). Returns y (b, d)."""
    op = "selective_scan_step"
    check_tensor(op, "u", u, (None, None))
    b, d = u.shape
    check_tensor(op, "A", A, (d, None), FP32, device=u.device)
    n = A.shape[1]
    check_tensor(op, "ssm_state", ssm_state, (None, d, n), FP32, device=u.device)
    check_tensor(op, "delta", delta, (b, d), device=u.device)
    check_tensor(op, "B", B, (b, n) if B.dim() == 2 else (b, None, n), device=u.device)
    check_groups(op, "B", B, d, 3)
    check_tensor(op, "C", C, (b, n) if C.dim() == 2 else (b, None, n), device=u.device)
    check_groups(op, "C", C, d, 3)
    check_mamba1_options(op, D, z, delta_bias, (b, d), u.device)
    rows = pool_rows(op, ssm_state, b, state_indices)
    if choose_backend(op, backend, u.device) == "triton":
        if torch.compiler.is_compiling():  # see conv1d_step
            from streamssm.kernels.library import selective_scan_step as impl
        else:  # the launcher
            from streamssm.kernels.mamba1.step import selective_scan_step_triton as impl
        return impl(ssm_state, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), rows)
    if backend != "reference" and torch.compiler.is_compiling():
        from streamssm.kernels.mamba1 import scan_cpu

        if scan_cpu.step_applies(ssm_state, u, delta, A, B, C, D, z, delta_bias, traced=True):  # the C step's op
            from streamssm.kernels.cpu_ops import selective_scan_step_cpu

            return selective_scan_step_cpu(ssm_state, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                           rows).to(u.dtype)
    if _use_reference(backend):
        from streamssm.kernels.mamba1.reference import selective_scan_step_ref

        y, new = selective_scan_step_ref(ssm_state.index_select(0, rows), u, delta, A, B, C, D, z,
                                         delta_bias, delta_softplus)
        _update_pool(ssm_state, rows, new)
        return y
    from streamssm.kernels.mamba1.step_cpu import selective_scan_step_cpu

    return _step_in_place(ssm_state, rows, state_indices is not None, lambda block: selective_scan_step_cpu(
        block, u, delta, A, B, C, D, z, delta_bias, delta_softplus))


def ssd_step(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_indices: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """One Mamba-2 step; **updates ``ssm_state`` (pool, h, p, n) fp32 in place** at ``state_indices``.

    x, z (b, h, p); dt (b, h); B, C (b, g, n). Returns y (b, h, p)."""
    op = "ssd_step"
    check_tensor(op, "x", x, (None, None, None))
    b, h, p = x.shape
    check_tensor(op, "B", B, (b, None, None), device=x.device)
    g, n = B.shape[1], B.shape[2]
    check_divisible(op, "heads", h, g)
    check_tensor(op, "C", C, (b, g, n), device=x.device)
    check_tensor(op, "ssm_state", ssm_state, (None, h, p, n), FP32, device=x.device)
    check_tensor(op, "dt", dt, (b, h), device=x.device)
    check_tensor(op, "A", A, (h,), FP32, device=x.device)
    check_ssd_options(op, D, z, dt_bias, (b, h, p), x.device)
    rows = pool_rows(op, ssm_state, b, state_indices)
    if choose_backend(op, backend, x.device) == "triton":
        if torch.compiler.is_compiling():  # see conv1d_step
            from streamssm.kernels.library import ssd_step as impl
        else:  # the launcher
            from streamssm.kernels.ssd.step import ssd_step_triton as impl
        return impl(ssm_state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), rows)
    if backend != "reference" and torch.compiler.is_compiling() and ssm_state.is_contiguous():
        from streamssm.kernels.ssd import scan_cpu

        if scan_cpu.applies(ssm_state, x, dt, A, B, C, D, z, dt_bias, traced=True):  # the C scan's op, one step
            from streamssm.kernels.cpu_ops import ssd_step_op

            return ssd_step_op(ssm_state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), rows)
    if _use_reference(backend):
        from streamssm.kernels.ssd.reference import ssd_step_ref

        y, new = ssd_step_ref(ssm_state.index_select(0, rows), x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        _update_pool(ssm_state, rows, new)
        return y
    from streamssm.kernels.ssd.step_cpu import ssd_step_cpu

    return _step_in_place(ssm_state, rows, state_indices is not None, lambda block: ssd_step_cpu(
        block, x, dt, A, B, C, D, z, dt_bias, dt_softplus))


# ----------------------------------------------------------------------------- Mamba-3


def mamba3_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lam: torch.Tensor,
    theta: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    initial_carry: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    backend: Backend = "auto",
):
    """Mamba-3 over a chunk (see ``mamba3/reference.py`` for the recurrence).

    x, z (b, l, h, p); dt, lam (b, l, h) with dt > 0 (softplus applied by the caller), lam in
    [0, 1]; A (h,) fp32; B, C (b, l, g, n), n even; theta (b, l, g, n/2) rad per unit dt;
    D (h,) or (h, p) fp32; initial_state (b, h, p, n) fp32; initial_carry (b, h*p + g*n) fp32.
    ``chunk_size`` is the chunk of the inner ssd_scan call (64, as ``ModelConfig``).
    Returns y (b, l, h, p) [, final_state (b, h, p, n), final_carry (b, h*p + g*n)]."""
    op = "mamba3_scan"
    check_tensor(op, "x", x, (None, None, None, None))
    b, l, h, p = x.shape
    check_positive_length(op, "x", l)
    g, n = check_mamba3(op, x.shape, B, C, theta, A, D, x.device)
    check_tensor(op, "dt", dt, (b, l, h), device=x.device)
    check_tensor(op, "lam", lam, (b, l, h), device=x.device)
    check_tensor(op, "z", z, (b, l, h, p), device=x.device, optional=True)
    check_tensor(op, "initial_state", initial_state, (b, h, p, n), FP32, device=x.device, optional=True)
    check_tensor(op, "initial_carry", initial_carry, (b, h * p + g * n), FP32, device=x.device, optional=True)
    check_chunk_size(op, chunk_size)
    args = (x, dt, A, B, C, lam, theta, D, z, initial_state, initial_carry, return_final_state)
    resolved = choose_backend(op, backend, x.device)
    if resolved == "reference":
        from streamssm.kernels.mamba3.reference import mamba3_scan_ref

        return mamba3_scan_ref(*args)
    from streamssm.kernels.mamba3.chunked import mamba3_scan_chunked

    return mamba3_scan_chunked(*args, chunk_size=chunk_size, backend=resolved)


def mamba3_step(
    ssm_state: torch.Tensor,
    carry: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lam: torch.Tensor,
    theta: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """One step; **updates ``ssm_state`` (pool, h, p, n) and ``carry`` (pool, h*p + g*n) in
    place** at ``state_indices`` (b,) (default 0..b-1). x, z (b, h, p); dt, lam (b, h);
    B, C (b, g, n); theta (b, g, n/2). Returns y (b, h, p)."""
    op = "mamba3_step"
    check_tensor(op, "x", x, (None, None, None))
    b, h, p = x.shape
    g, n = check_mamba3(op, x.shape, B, C, theta, A, D, x.device)
    check_tensor(op, "dt", dt, (b, h), device=x.device)
    check_tensor(op, "lam", lam, (b, h), device=x.device)
    check_tensor(op, "z", z, (b, h, p), device=x.device, optional=True)
    check_tensor(op, "ssm_state", ssm_state, (None, h, p, n), FP32, device=x.device)
    check_tensor(op, "carry", carry, (ssm_state.shape[0], h * p + g * n), FP32, device=x.device)
    for name, pool in (("ssm_state", ssm_state), ("carry", carry)):
        if not pool.is_contiguous():
            raise ShapeError(f"{op}: {name} must be contiguous (it is updated in place)")
    rows = pool_rows(op, ssm_state, b, state_indices)
    if choose_backend(op, backend, x.device) == "triton":
        if torch.compiler.is_compiling():  # see conv1d_step
            from streamssm.kernels.library import mamba3_step as impl
        else:  # the launcher
            from streamssm.kernels.mamba3.step import mamba3_step_triton as impl
        return impl(ssm_state, carry, x, dt, A, B, C, lam, theta, D, z, rows)
    from streamssm.kernels.mamba3.reference import mamba3_step_ref

    y, new_state, new_carry = mamba3_step_ref(ssm_state.index_select(0, rows), carry.index_select(0, rows), x, dt, A,
                                              B, C, lam, theta, D, z)
    _update_pool(ssm_state, rows, new_state)
    _update_pool(carry, rows, new_carry)
    return y


# ----------------------------------------------------------------------------- residual add + RMSNorm


def add_rms_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + y and RMSNorm(h) * weight in one pass (the step's layer epilogue).

    x, y (b, d); weight (d,). Returns (h, normed), both (b, d) in x.dtype. Forward-only kernels
    (Triton; C for fp32 on the CPU, ``norm/norm_cpu.py``): calls that record gradients run the
    reference (``norm/reference.py``)."""
    op = "add_rms_norm"
    check_tensor(op, "x", x, (None, None))
    check_tensor(op, "y", y, tuple(x.shape), device=x.device)
    check_tensor(op, "weight", weight, (x.shape[1],), device=x.device)
    choice = choose_backend(op, backend, x.device)
    if choice == "triton" and not needs_grad(x, y, weight):
        from streamssm.kernels.norm.add_rms_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, y, weight, eps)
    from streamssm.kernels.norm import norm_cpu

    if choice == "torch" and norm_cpu.applies(x, y, weight):  # fp32 CPU without gradients: C
        return norm_cpu.add_rms_norm_cpu(x, y, weight, eps)
    from streamssm.kernels.norm.reference import add_rms_norm_ref

    return add_rms_norm_ref(x, y, weight, eps)


__all__ = [
    "add_rms_norm",
    "causal_conv1d",
    "conv1d_step",
    "mamba3_scan",
    "mamba3_step",
    "selective_scan",
    "selective_scan_step",
    "ssd_scan",
    "ssd_scan_pool",
    "ssd_step",
]
