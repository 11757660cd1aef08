"""C kernels for the CPU, built on first use with the system's C++ compiler and loaded with ctypes.

A kernel module gives its C++ source (functions ``extern "C"``) and gets a ``ctypes.CDLL`` from
:func:`build_library`, or None where no C++ compiler builds it (logged once per library; its
callers then run their PyTorch paths). A library is compiled once per machine into
``$XDG_CACHE_HOME/streamssm`` (~1-2 s), named by a hash of its source, flags, compiler and the
CPU's instruction sets (it is built for this CPU: a home directory shared with another kind of
machine gets a library of its own there), so a changed source builds anew and concurrent processes
(pytest workers, server workers) each find a whole file. ctypes releases the GIL for the length of
a call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

from streamssm.kernels._common import needs_grad

log = logging.getLogger(__name__)

#: -O3 with reassociation so float reductions vectorize; -march=native: the library is built on
#: the machine that runs it; -pthread: the scans' std::threads
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-pthread", "-shared", "-fPIC")


@functools.cache
def cpu_identity() -> str:
    """The architecture and, on Linux, the instruction-set flags of this CPU (what -march=native
    compiles for)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags.strip()}"


def runs_in_c(library: Callable[[], ctypes.CDLL | None], tensors: tuple[torch.Tensor | None, ...],
              dtypes: tuple[torch.dtype, ...] = (torch.float32,), traced_as: str | None = None) -> bool:
    """Whether a call on ``tensors`` (None: absent) takes a C kernel of ``library``: CPU tensors of
    ``dtypes``, no gradient wanted and the library built. While torch.compile traces, only a caller
    that then calls the kernel's registered op (``kernels/cpu_ops.py``) gets True, naming the
    kernel's module in ``traced_as`` (its ``__name__``: the library's availability is read once,
    as a constant of the graph); never while torch.export traces non-strict, its default (the
    exported graphs stay pure PyTorch: ONNX)."""
    present = [t for t in tensors if t is not None]
    if not all(t.device.type == "cpu" and t.dtype in dtypes for t in present) or needs_grad(*present):
        return False
    if torch.compiler.is_compiling():
        # torch.export's default (non-strict) trace runs this Python with is_exporting() true; Dynamo
        # reads is_exporting() as true even under torch.compile, so a strict export is not told
        # apart (the ONNX export records gradients, which no C kernel takes)
        exporting = torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()
        return traced_as is not None and not exporting and built(traced_as)
    return library() is not None


def built(module: str) -> bool:
    """Whether the library of kernel module ``module`` (its ``library()``) is built here; a constant
    to torch.compile (which cannot trace the build)."""
    return importlib.import_module(module).library() is not None


# torch.compiler.assume_constant_result(built) without its ``import torch._dynamo``, which took 1.1-1.8 s
# and ~100k objects into every process that runs a C kernel (CLI start-up; the service benchmark's
# clients stalled in full collections of them): the decorator sets no more than this attribute
built._dynamo_marked_constant = True


def int64_rows(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Pool rows as the C kernels read them: int64, contiguous (None: rows 0..b-1, kept None)."""
    return None if rows is None else rows.to(torch.int64).contiguous()


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for a C call; None (NULL) for an absent one."""
    return None if t is None else t.data_ptr()


def strided_rows(t: torch.Tensor | None) -> list:
    """t (b, l, ...) -> [fp32 t with its trailing dims contiguous (copied only where they are not),
    its (b, l) strides]: what the kernels read through; [None, 0, 0] for an absent one. Keep the
    returned tensor referenced until the C call returns."""
    if t is None:
        return [None, 0, 0]
    t = t.float()
    if t.numel() == 0 or not _trailing_contiguous(t):
        t = t.contiguous()
    return [t, t.stride(0), t.stride(1)]


def _trailing_contiguous(t: torch.Tensor) -> bool:
    """Whether t's dims after the first two are contiguous (as ``t[0, 0].is_contiguous()``, without
    the view: ~2 us of a one-step call's ~25 us of Python)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "streamssm"


@functools.cache
def compiler() -> str | None:
    """The C++ compiler the kernels are built with: ``$CXX``, else the first of c++, g++, clang++ on
    the PATH; None where there is none. (Looked up here rather than through inductor, whose import
    costs a CPU process ~1.2 s at start-up.)"""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


#: argument type codes of :func:`build_library`'s signatures
ARG_TYPES = {"i": ctypes.c_int64, "f": ctypes.c_float, "p": ctypes.c_void_p}


def build_library(name: str, source: str, functions: dict[str, str] | None = None) -> ctypes.CDLL | None:
    """``source`` compiled (or found in the cache) and loaded, its ``functions`` (void, arguments
    spelt one character each: i int64_t, f float, p pointer) given their ctypes signatures; None,
    with a warning naming the reason, where no C++ compiler builds it."""
    cxx = compiler()
    if cxx is None:
        log.warning("the C kernels of %s are off (PyTorch runs instead): no C++ compiler ($CXX, c++, g++ or "
                    "clang++ on the PATH)", name)
        return None
    key = hashlib.sha256("\n".join([source, *FLAGS, cxx, cpu_identity()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}_{key}.so"
    try:
        if not path.exists():
            _build(cxx, source, path)
        lib = ctypes.CDLL(str(path))
        for function, args in (functions or {}).items():
            fn = getattr(lib, function)
            fn.restype, fn.argtypes = None, [ARG_TYPES[code] for code in args]
        return lib
    except (OSError, AttributeError, subprocess.SubprocessError) as err:  # unwritable cache, failed build or load
        log.warning("the C kernels of %s are off (PyTorch runs instead): %s", name, err)
        return None


def _build(cxx: str, source: str, path: Path) -> None:
    """Compile ``source`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, out = Path(tmp) / "kernel.cpp", Path(tmp) / path.name
        src.write_text(source)
        done = subprocess.run([cxx, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            raise subprocess.SubprocessError(f"{cxx} failed: {done.stderr.strip()[-400:]}")
        os.replace(out, path)
