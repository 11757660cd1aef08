"""Compiled CPU model calls (``Streamer(engine="compiled")``): the Streamer's call
(``streamssm.engine.EagerCalls.run``) compiled by ``torch.compile`` with inductor's C++ backend.

One compiled program serves every call: the stream count ``b`` and the segment length ``l``
are symbolic (marked dynamic; the pool's sizes stay fixed), so a server whose batches change size every call compiles a
handful of graphs (b or l == 1 are specialized by torch: the pool step, one stream), not one
per (bucket, length) as the CUDA graphs do (on two loaded cores one fixed-shape compile costs
tens of seconds and buys little more: benchmarks/README.md, CPU). Traced whole, a layer's pool
step (in_proj, conv step, SSM step, gate, out_proj, residual + norm) becomes a few fused C++
loops instead of ~20 eager ops; the pool rows are updated in place as in the eager call.

The C++ toolchain is checked once per process (:func:`compiler_problem`: inductor's compiler
must build a shared library); without one, ``resolve_engine`` logs a warning naming the reason
and the Streamer runs ``eager``. Compiling happens at the first call of each new kind of shape,
or up front (``Streamer.capture``, ``streamssm serve --prepare``), on the pool's scratch row so
no stream's state is touched. Outputs and states equal the eager engine's to fp32 tolerance
(tests/test_compiled_cpu.py).
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

#: segment lengths compiled by :meth:`CompiledCalls.prepare`: the pool step and a symbolic length
#: (the service's usual slice, ServeConfig.slice_samples; any l >= 2 then runs the same program)
PREPARE_LENGTHS = (1, 256)
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


def compiled_available() -> bool:
    """True when the ``compiled`` engine can run here; else logs a warning naming the reason."""
    problem = compiler_problem()
    if problem is not None:
        log.warning("engine 'compiled' falls back to 'eager': %s", problem)
    return problem is None


class CompiledCalls(EagerCalls):
    """The model call compiled once for symbolic shapes (module docstring). ``capacity`` is the
    pool's scratch row (the pool holds ``capacity + 1`` rows), where :meth:`prepare` runs."""

    name = "compiled"

    def __init__(self, model: SSMModel, pool: ModelState, capacity: int):
        super().__init__(model, pool)
        self.scratch = capacity
        self._compiled = torch.compile(self.run)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (b, l[, c]), rows (b,) -> raw outputs (b, l, o) (a new tensor)."""
        # b and l symbolic from the first call on (1 stays specialized); the pool's sizes stay
        # static, so no size of it is ever unified with b (torch's "duck sizing"); contiguous
        # inputs, so a round's strided slice of the padded batch reuses the same program
        x, rows = x.contiguous(), rows.contiguous()
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(x, 1)
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        return self._compiled(x, rows)

    @torch.no_grad()  # as the Streamer calls: a program compiled with grad mode on is another one
    def prepare(self) -> float:
        """Compile the :data:`PREPARE_LENGTHS` segments, for one stream and for several, now
        rather than at first use (all on the scratch row); returns seconds."""
        t0 = time.perf_counter()
        m = self.model
        device = next(m.parameters()).device
        for b in (1, 2):
            rows = torch.full((b,), self.scratch, dtype=torch.long, device=device)
            for length in PREPARE_LENGTHS:
                if self._tokens:
                    x = torch.zeros(b, length, dtype=torch.long, device=device)
                else:
                    x = torch.zeros(b, length, m.cfg.input_dim, dtype=m.encoder.weight.dtype, device=device)
                self._compiled(x, rows)
        return time.perf_counter() - t0
