"""Compiled CPU model calls (``Streamer(engine="compiled")``): the Streamer's call
(``streamssm.engine.EagerCalls.run``) compiled whole (``fullgraph``) by ``torch.compile`` with
inductor's C++ backend.

The stream count ``b`` and the segment length ``l`` are symbolic (marked dynamic; the pool's
sizes stay fixed), so a server whose batches change size every call runs a bounded set of
programs, not one per (bucket, length) as the CUDA graphs do. The C kernels that the eager call
runs (``kernels/cpu_library.py``: conv, conv step, the Mamba-1 and SSD scans and steps) are
registered ops (``kernels/cpu_ops.py``), one graph node each, called where the eager call calls
them and updating the pool rows in place as it does; the rest of a layer (in_proj, the dt/B/C
projections, gate, norms, out_proj, residual) becomes a few fused C++ loops instead of ~20 eager
ops. Torch specializes a size of 1 (so one stream runs as two, the second on the scratch row;
l == 1 is the pool step), so a model whose kernels all run in C compiles two programs: the pool
step and one chunk program for every length (the demo's audio model: 2 programs, prepared in
18 s). Where a C kernel does not apply (its library not built; Mamba-1's step needs d and n
multiples of 16) the graph traces its PyTorch reference, whose chunked SSD compiles one program
per chunk count and per "fills its last chunk" (the demo's model, chunk 64, l <= 256: 9 per range
of b; 17 programs and 98-443 s to prepare before the ops).

The C++ toolchain is checked once per process (:func:`compiler_problem`: inductor's compiler
must build a shared library); without one, ``resolve_engine`` logs a warning naming the reason
and the Streamer runs ``eager``. Compiling happens at the first call of each new kind of shape,
or up front (``Streamer.capture``, ``streamssm serve --prepare``: every program a call of up to
the pool's streams x :data:`PREPARE_MAX` samples needs, on the pool's scratch row so no stream's
state is touched). A longer segment runs as consecutive calls of at most PREPARE_MAX samples
through the same programs. After that, nothing compiles: a call no program covers runs eagerly
(logged once) rather than stalling the caller for a compile (issue 19: 69 s in a server's hot path).
Outputs and states equal the eager engine's to fp32 tolerance (tests/test_compiled_cpu.py).

Speed (2026-12-07, the 2-core development CPU, 1 thread, issue 19): before the ops a traced call
stepped around the C kernels and ran the references, so the compiled engine was the slower one; now
it runs the same kernels without the eager call's Python between them. The demo's audio model at 12
streams x 320 samples (engine alone, median of 15, alternated, two pairs): compiled 16.6 / 17.9 ->
9.9 / 10.1 ms, eager 10.5 / 11.6 and 10.7 / 9.2 ms (now eager's speed); the one-step call of 64
streams, d128 x 4 (``bench_cpu.py --suite targets --configs ''``, two alternated pairs): Mamba
compiled 0.90-0.91x -> 1.05x eager's speed (3.09 / 2.99 ms against eager's 3.25 / 3.13), Mamba-2
0.98-1.01x -> 1.11-1.18x (2.51 / 2.39 ms against 2.78 / 2.82). The step is GEMM-bound (the linears
~1 ms of ~2.4) and the C kernels take most of the rest: compiling saves 0.15-0.43 ms a step, not the
~1 ms of Python once estimated, and Dynamo's guard check costs ~0.15 ms of every compiled call
(profiled).
"""

from __future__ import annotations

import functools
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from streamssm.engine import EagerCalls
from streamssm.models import SSMModel
from streamssm.state import ModelState

log = logging.getLogger(__name__)

#: :meth:`CompiledCalls.prepare` compiles the programs of segments of 1..PREPARE_MAX samples; a
#: longer segment runs as consecutive calls of at most PREPARE_MAX (a multiple of the SSD chunk
#: size keeps the unsplit call's chunk boundaries)
PREPARE_MAX = 256
#: programs one CompiledCalls may compile (torch's default, 8, is fewer than the kinds of shape:
#: the SSD compiles two per chunk count, times the stream counts that change a conv backend)
RECOMPILE_LIMIT = 256
_PROBE_SOURCE = '#include <cmath>\nextern "C" double streamssm_probe(double x) { return std::exp(x); }\n'


def compiler_problem() -> str | None:
    """None when inductor's C++ compiler (``torch._inductor.config.cpp.cxx``) builds a shared
    library here, else the reason; checked once per compiler setting."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    return _probe(tuple(cxx) if isinstance(cxx, (list, tuple)) else (cxx,))


@functools.cache
def _probe(search: tuple[str | None, ...]) -> str | None:
    from torch._inductor import cpp_builder, exc

    try:
        cxx = cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError) as err:
        return f"no working C++ compiler among {[c for c in search if c]} ({type(err).__name__})"
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text(_PROBE_SOURCE)
        try:
            done = subprocess.run([cxx, "-shared", "-fPIC", "-O1", str(src), "-o", str(lib)],
                                  check=False, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"C++ compiler {cxx!r} did not run: {err}"
    if done.returncode != 0:
        return f"C++ compiler {cxx!r} cannot build a shared library: {done.stderr.strip()[-400:]}"
    return None


def widths(capacity: int) -> list[int]:
    """Stream counts :meth:`CompiledCalls.prepare` runs: 2, 4, 8, ... below ``capacity``, and
    ``capacity`` (at least 2)."""
    out = [2]
    while out[-1] * 2 < capacity:
        out.append(out[-1] * 2)
    return out + [capacity] if capacity > 2 else out


def program_options() -> dict[str, int]:
    """Inductor options of the engine's programs: their OpenMP threads are torch's threads now.
    Inductor bakes ``torch.get_num_threads()`` into the C++ (``omp parallel num_threads(n)``) but
    its on-disk cache key leaves it out, so a process at ``serve --threads 1`` loaded the programs
    another process compiled at 2 threads, whose parallel loops stall at their barriers when the
    cores are shared (issue 19); ``cpp.threads`` is part of the key."""
    return {"cpp.threads": torch.get_num_threads()}


def compiled_available() -> bool:
    """True when the ``compiled`` engine can run here; else logs a warning naming the reason."""
    problem = compiler_problem()
    if problem is not None:
        log.warning("engine 'compiled' falls back to 'eager': %s", problem)
    return problem is None


class CompiledCalls(EagerCalls):
    """The model call compiled once for symbolic shapes (module docstring). ``capacity`` is the
    pool's scratch row (the pool holds ``capacity + 1`` rows), where :meth:`prepare` runs and
    where a one-stream call's padding row goes."""

    name = "compiled"

    def __init__(self, model: SSMModel, pool: ModelState, capacity: int):
        super().__init__(model, pool)
        self.scratch = capacity
        self.capacity = capacity
        # one graph for the whole call: a guard fails (and a fallback runs) before anything ran
        self._compiled = torch.compile(self.run, fullgraph=True, options=program_options())
        self._prepared = False  # after prepare(): never compile again (eager fallback instead)
        self._fell_back = False

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (b, l[, c]), rows (b,) -> raw outputs (b, l, o) (a new tensor). A segment longer than
        :data:`PREPARE_MAX` runs as consecutive calls of at most PREPARE_MAX samples (the pool
        carries each stream's state from one to the next, as between a stream's chunks), so the
        prepared programs cover every length (issue 19: the service's slices of up to 640 samples
        ran eagerly, each call after a failed guard check, slower than the eager engine)."""
        length = x.shape[1]
        if length > PREPARE_MAX:
            return torch.cat([self._segment(x[:, start:start + PREPARE_MAX], rows)
                              for start in range(0, length, PREPARE_MAX)], dim=1)
        return self._segment(x, rows)

    def _segment(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (b, l[, c]) with l <= PREPARE_MAX, rows (b,) -> raw outputs (b, l, o)."""
        b = x.shape[0]
        if b == 1:  # torch specializes a size of 1: one stream runs as two, the second on the scratch row
            x = torch.cat([x, x.new_zeros(x.shape)])
            rows = torch.cat([rows, rows.new_full((1,), self.scratch)])
        y = self._call(x.contiguous(), rows.contiguous())
        return y[:b] if b == 1 else y

    def _call(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The compiled program for b >= 2 streams; after :meth:`prepare`, a shape it did not
        cover runs eagerly (logged once) instead of compiling in the caller's hot path."""
        # b and l symbolic (l == 1 is the pool step); the pool's sizes stay static, so no size of
        # it is ever unified with b (torch's "duck sizing"); contiguous inputs, so a round's
        # strided slice of the padded batch reuses the same program
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(x, 1)
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        if not self._prepared:  # compiling on demand: one program per kind of shape (module docstring)
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self._compiled(x, rows)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._compiled(x, rows)
        except RuntimeError as err:
            if "fail_on_recompile" not in str(err):
                raise
            if not self._fell_back:
                self._fell_back = True
                log.warning("compiled engine: a call of %d streams x %d samples needs a new program; it and "
                            "any like it run eagerly (no compiling while serving): %s",
                            x.shape[0], x.shape[1], str(err).splitlines()[0])
            return self.run(x, rows)

    @torch.no_grad()  # as the Streamer calls: a program compiled with grad mode on is another one
    def prepare(self) -> float:
        """Compile now every program that a call of 2..capacity streams (one stream runs as two)
        over 1..:data:`PREPARE_MAX` samples needs, all on the scratch row; later calls never
        compile (:meth:`_call`). Returns seconds.

        Lengths share a program unless a kernel branches on them (the SSD's chunk count, a
        length that fills its last chunk): one call per length at 2 streams compiles each such
        class of lengths; then each wider stream count of :func:`widths` runs the first and last
        length of every class (a kernel may also branch on the stream count: conv backends, the
        SSD's blocks)."""
        t0 = time.perf_counter()
        starts = [length for length in range(1, PREPARE_MAX + 1) if self._compiles(2, length)]
        edges = sorted({*starts, *(s - 1 for s in starts[1:]), PREPARE_MAX})
        for b in widths(self.capacity)[1:]:
            for length in edges:
                self._compiles(b, length)
        self._prepared = True
        return time.perf_counter() - t0

    def _compiles(self, b: int, length: int) -> bool:
        """Run one call of ``b`` streams x ``length`` zero samples on the scratch row; True when
        it compiled a new program."""
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self._call(self._zeros(b, length), torch.full((b,), self.scratch, dtype=torch.long, device=self._device))
        return torch._dynamo.utils.counters["stats"]["unique_graphs"] > before

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _zeros(self, b: int, length: int) -> torch.Tensor:
        """Inputs x (b, length[, c]) of the model's kind, all zero."""
        if self._tokens:
            return torch.zeros(b, length, dtype=torch.long, device=self._device)
        m = self.model
        return torch.zeros(b, length, m.cfg.input_dim, dtype=m.encoder.weight.dtype, device=self._device)
