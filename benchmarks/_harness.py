"""Shared benchmark plumbing: shape registry, timing (eager and CUDA-graph replay), peak memory,
a markdown table with ratios, and the GPU/commit tag of a run.

Timing uses ``triton.testing.do_bench`` (median, L2 flushed between calls). Graph timing
captures one call in a CUDA graph after warm-up (so autotuning is done) and times replays:
GPU time without launch overhead. Ratios are peer time / our time (> 1: we are faster).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

#: H100 device-to-device copy bandwidth, read + write, TB/s (BENCHMARKS.md): the byte floors
COPY_TBPS = 3.0

# name -> sizes (shared/BENCHMARKS.md)
SSD_SHAPES: dict[str, dict[str, int]] = {
    "S1": dict(batch=8, length=4096, heads=24, headdim=64, dstate=128),
    "S2": dict(batch=2, length=16384, heads=32, headdim=64, dstate=128),
    "S3": dict(batch=1, length=1_048_576, heads=8, headdim=64, dstate=64),
}
MAMBA1_SHAPES: dict[str, dict[str, int]] = {
    "M1": dict(batch=8, dim=1536, length=4096, dstate=16),
    "M2": dict(batch=2, dim=2048, length=16384, dstate=16),
    "M3": dict(batch=1, dim=512, length=1_048_576, dstate=16),
}


def run_tag() -> str:
    """'<GPU name> · torch x · triton y · commit abc1234[+dirty]': ``STREAMSSM_COMMIT`` where set (a
    copy of the tree whose .git is not the code's, e.g. the device machine's), else git's."""
    import triton

    root = Path(__file__).resolve().parent.parent
    commit = os.environ.get("STREAMSSM_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                    text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True).stdout.strip()
            commit += "+dirty" if dirty else ""
        except (OSError, subprocess.CalledProcessError):  # e.g. a copy of the tree without .git
            commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{gpu} · torch {torch.__version__} · triton {triton.__version__} · commit {commit}"


def report(text: str, out: str | Path | None) -> None:
    """Print a run's result text and, with ``out``, also write it (plus a newline) to that file."""
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n")


def time_eager(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median ms of ``fn()`` launched from Python."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_graph(fn: Callable[[], object], warmup_calls: int = 3, rep: int = 100) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph (run ``warmup_calls`` first)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = float(do_bench(graph.replay, warmup=10, rep=rep, return_mode="median"))
    del graph
    return ms


def max_rel_diff(ref: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> float:
    """The worst pair's max |got - ref| over its max |ref| (float64), over pairs of outputs."""
    return max(float((g.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))
               for r, g in zip(ref, got))


def kernel_profile(fn: Callable[[], object], calls: int = 3, top: int = 15, warmup_calls: int = 2) -> str:
    """torch.profiler's table of the GPU kernels of ``calls`` runs of ``fn`` (after
    ``warmup_calls``), by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup_calls):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def peak_memory_gib(fn: Callable[[], object]) -> float:
    """Peak memory allocated during ``fn()`` above what was allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


@dataclass
class Table:
    """Rows of measurements; ``ratio_of`` columns get 'peer / ours' ratios against ``ours``."""

    columns: list[str]
    ratio_of: list[str] = field(default_factory=list)
    ours: str = "ours"
    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        cols = list(self.columns) + [f"{c} ratio" for c in self.ratio_of]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self.rows:
            base = next((r for r in self.rows if r.get("shape") == row.get("shape") and r.get("kernel") == self.ours),
                        None)
            cells = [_fmt(row.get(c)) for c in self.columns]
            for c in self.ratio_of:
                mine, theirs = (base or {}).get(c), row.get(c)
                cells.append(f"{theirs / mine:.2f}x" if isinstance(mine, float) and isinstance(theirs, float)
                             and mine > 0 else "–")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
