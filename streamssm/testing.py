"""Per-dtype tolerances and the one ``assert_close`` used by every kernel and parity test; the
sm_90 cross-compile of a kernel, the runner of the scripts that make them and what the binary holds
(ptxas's registers and spills, the SASS and its loops); the peak of tensor memory a call allocates."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import tempfile
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: (rtol, atol) per dtype of the *inputs* of the computation under test.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (3e-4, 1e-3),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}

#: Tight tolerance for parity of execution modes (full == chunked == step) in fp32.
PARITY_FP32 = (1e-5, 1e-5)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for computations whose inputs are ``dtype``."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype}")
    return TOLERANCES[dtype]


def assert_close(
    name: str,
    expected: torch.Tensor,
    actual: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Compare ``actual`` against ``expected`` in fp64 with the tolerance of ``dtype``.

    The error message names the quantity, the largest absolute and relative error and
    where it occurred, so a failing gradient check says which gradient broke.
    """
    d_rtol, d_atol = tolerance(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if expected.shape != actual.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    e = expected.detach().to("cpu", torch.float64)
    a = actual.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        raise AssertionError(f"{name}: non-finite values in result")
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = diff > bound
    if bad.any():
        idx = int(torch.argmax((diff - bound).flatten()))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape))
        max_abs = float(diff.max())
        rel = float((diff / e.abs().clamp_min(1e-12)).flatten()[idx])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance "
            f"(rtol={rtol}, atol={atol}); max abs err {max_abs:.3e}; worst at {where}: "
            f"expected {float(e[where]):.6g}, got {float(a[where]):.6g} (rel {rel:.3e})"
        )


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block, then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_in_chunks(model, x: torch.Tensor, cuts: list[int]):
    """Run ``model`` over ``x`` (b, l, ...) split at time indices ``cuts``, carrying the state;
    returns (outputs concatenated in time, final state)."""
    state, outs = None, []
    for start, end in zip([0, *cuts], [*cuts, x.shape[1]]):
        y, state = model(x[:, start:end], state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def run_step_by_step(model, x: torch.Tensor, state=None):
    """Run ``model.step`` over every time step of ``x`` (b, l, ...) from ``state`` (zeros when
    None); returns (outputs stacked in time, final state)."""
    if state is None:
        state = model.init_state(x.shape[0], x.device, next(model.parameters()).dtype)
    outs = []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state)
        outs.append(y)
    return torch.stack(outs, dim=1), state


def assert_states_close(name: str, expected, actual, rtol: float | None = None, atol: float | None = None) -> None:
    """``assert_close`` on every tensor of two ModelStates (same dtypes, same layer count)."""
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        for field, et, at in zip(type(e)._fields, e, a):
            assert et.dtype == at.dtype, f"{name} layer{i}.{field}: dtype {at.dtype}, expected {et.dtype}"
            assert_close(f"{name} layer{i}.{field}", et, at, rtol=rtol, atol=atol)


def compile_for_sm90(fn, consts: dict, pointer: Callable[[str], str], num_warps: int, num_stages: int = 3, *,
                     scalars: dict[str, str] | None = None, aligned: bool = False, maxnreg: int | None = None):
    """``fn`` (a ``triton.jit`` function) compiled for an sm_90 target with Triton's bundled ptxas,
    no GPU needed: the entries of ``consts`` that name its arguments are constexprs, every other
    argument named ``p_...`` a pointer typed ``pointer(name)`` (e.g. ``"*bf16"``), the rest typed
    ``scalars[name]`` or i32. ``aligned``: every argument a multiple of 16 (as the vector loads of
    aligned tensors see it); ``maxnreg`` caps the registers per thread. Call it with
    TRITON_INTERPRET=0 (a script run by :func:`assert_script_compiles_for_sm90`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {a: v for a, v in consts.items() if a in fn.arg_names}
    scalars = scalars or {}
    sig = {a: "constexpr" if a in consts else pointer(a) if a.startswith("p_") else scalars.get(a, "i32")
           for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t != "constexpr"} \
        if aligned else None
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def _run_on_file(command: Callable[[str], list[str]], data: str | bytes, suffix: str) -> subprocess.CompletedProcess:
    """``command(path)`` run (text output captured, failing on a non-zero exit) on ``data`` written to a
    temporary file ``*suffix``, removed afterwards."""
    with tempfile.NamedTemporaryFile("wb", suffix=suffix, delete=False) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    try:
        return subprocess.run(command(f.name), capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of ``ptx`` as Triton's bundled ptxas -v reports
    them for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    info = _run_on_file(lambda path: [get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                        ptx, ".ptx").stderr
    return int(re.search(r"Used (\d+) registers", info)[1]), int(re.search(r"(\d+) bytes spill stores", info)[1])


def sass_of(cubin: bytes) -> str:
    """The SASS of a cubin (a compiled kernel's ``asm["cubin"]``) as Triton's nvdisasm prints it."""
    from triton import knobs

    return _run_on_file(lambda path: [knobs.nvidia.nvdisasm.path, "-c", path], cubin, ".cubin").stdout


def sass_loops(sass: str, min_size: int = 100) -> list:
    """Opcode counts (``collections.Counter``, opcodes cut at the first dot, predicated ones
    included) of each loop of ``sass`` (nvdisasm's text) longer than ``min_size`` instructions: a
    loop runs from a label to a branch back to it; in the order the branches appear."""
    labels, code, open_label = {}, [], None
    for line in sass.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            open_label = m[1]
            continue
        if m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line):
            address = int(m[1], 16)
            if open_label is not None:
                labels[open_label], open_label = address, None
            code.append((address, m[2].split(".")[0], m[3]))
    found = []
    for address, opcode, operands in code:
        target = re.search(r"(L_x_\d+)", operands) if opcode == "BRA" else None
        if target and labels.get(target[1], address) < address:
            body = [op for a, op, _ in code if labels[target[1]] <= a <= address]
            if len(body) > min_size:
                found.append(Counter(body))
    return found


def assert_script_compiles_for_sm90(script: str, *args: str) -> None:
    """Run ``script`` (Python that calls ``triton.compile`` for an sm_90 target) in a fresh
    interpreter with TRITON_INTERPRET=0: Triton cross-compiles with its bundled ptxas, no GPU
    needed (the interpreter runs none of the GPU pipeline). Fails with the script's stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


class _LiveStorages(TorchDispatchMode):
    """Bytes of the storages that ops create while active, each counted until it is freed
    (a finalizer on its UntypedStorage); ``peak`` is the most alive at once. The project's
    custom ops (``streamssm::``) run their implementation under the mode, so their temporaries
    count too."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known, self.live, self.now, self.peak = known, {}, 0, 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "streamssm":
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key in self.known or key in self.live or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key)
        return out


def peak_bytes_allocated(fn: Callable[[], object], *existing: torch.Tensor) -> int:
    """Peak bytes of CPU tensor storage alive at once during ``fn()`` that it allocated (storages
    of ``existing`` tensors, e.g. the inputs, are not counted even when ``fn`` views them).

    Runs under Python's default collection thresholds: Triton's interpreter leaves each launch's
    argument closures as cyclic garbage that holds the kernel's tensors until a collection, so the
    peak depends on how often the collector runs (a serving backend raises the threshold while it
    runs: ``service.backend.ServingCollector``)."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.set_threshold(700, 10, 10)
    mode = _LiveStorages({id(t.untyped_storage()) for t in existing})
    try:
        with mode:
            fn()
    finally:
        gc.set_threshold(*threshold)
    return mode.peak
