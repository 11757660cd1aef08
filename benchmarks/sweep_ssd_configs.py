"""Sweep the Triton tile configs of the SSD kernels, one forced config at a time.

On the H100 (from the repo root; the 10-minute command limit: one or two kernels per command):

    python benchmarks/sweep_ssd_configs.py --shape S1 --kernels dx,dc --max-seconds 480
    python benchmarks/sweep_ssd_configs.py --shape S2 --kernels dx,dc --max-seconds 480
    python benchmarks/sweep_ssd_configs.py --shape S1 --kernels scan_fwd,state,bmm

On CPU, to check the script end to end (no timings):

    TRITON_INTERPRET=1 python benchmarks/sweep_ssd_configs.py --shape tiny

For each kernel, each config of its grid (the kernel's own ``_CONFIGS`` first, marked ``*`` when
the autotuner picked it at this shape) is forced as the autotuner's only config, and one
``ssd_scan`` forward+backward (bf16 inputs of benchmarks/bench_ssd.py, chunk 256) is run:
"kern us" is the target kernel's GPU time per step (torch.profiler, mean of 5 steps; "n" its
launches per step: bmm and state run in the forward and the backward), "step ms" the
fwd+bwd median (do_bench), "maxrel" the largest max|diff| / max|default| over y and the
seven gradients against the autotuned defaults ("!" above 3e-2 bf16 / 1e-4 fp32), "s" the
seconds the config took (compiling included). The --max-seconds budget counts from the start
(the defaults' autotuning included) and is shared out evenly over the kernels (left-over time
rolls on); grids vary num_stages slowest, so a cut-short sweep has still tried every tile.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SSD_SHAPES, max_rel_diff, time_eager  # noqa: E402
from bench_ssd import NAMES, make_inputs, with_grads  # noqa: E402

from streamssm.kernels import ssd_scan  # noqa: E402
from streamssm.kernels.ssd import bmm_chunk, chunk_scan, chunk_scan_bwd, chunk_state  # noqa: E402

WARPS_STAGES = {"num_warps": (4, 8), "num_stages": (2, 3, 1)}  # stages outermost: early rows cover all tiles
ROW_TILES = {"BLOCK_T": (32, 64, 128), "BLOCK_I": (16, 32, 64), **WARPS_STAGES}  # BLOCK_T 16 overflows dD_part
TINY_ROWS = {"BLOCK_T": (16, 32), "BLOCK_I": (16,), "num_warps": (4,), "num_stages": (1,)}
# name -> (module, kernel attribute, GPU grid, interpreter grid)
KERNELS = {
    "dc": (chunk_scan_bwd, "_chunk_scan_bwd_dc_kernel", ROW_TILES, TINY_ROWS),
    "dx": (chunk_scan_bwd, "_chunk_scan_bwd_dx_kernel", ROW_TILES, TINY_ROWS),
    "scan_fwd": (chunk_scan, "_chunk_scan_fwd_kernel", ROW_TILES, TINY_ROWS),
    "state": (chunk_state, "_chunk_state_fwd_kernel",
              {"BLOCK_K": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (3, 2, 4, 1)},
              {"BLOCK_K": (32, 64), "num_warps": (4,), "num_stages": (1,)}),
    "bmm": (bmm_chunk, "_chunk_cb_fwd_kernel",
            {"BLOCK_M": (32, 64, 128), "BLOCK_K": (32, 64, 128), "num_warps": (4, 8), "num_stages": (3, 4, 2)},
            {"BLOCK_M": (32,), "BLOCK_K": (16, 32), "num_warps": (4,), "num_stages": (1,)}),
}
TINY = dict(batch=1, length=128, heads=2, headdim=16, dstate=16)


def make_step(t: dict[str, torch.Tensor], chunk: int):
    """A callable running one fwd+bwd; returns (y, *gradients of NAMES)."""
    leaves, params = with_grads(t, NAMES)

    def forward():
        return ssd_scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=chunk,
                        D=leaves["D"], dt_bias=leaves["dt_bias"], dt_softplus=True, backend="triton")

    torch.manual_seed(1)
    dy = torch.randn_like(forward())

    def step():
        y = forward()
        return (y.detach(), *torch.autograd.grad(y, params, dy))

    return step


def grid_configs(grid: dict[str, tuple]) -> list[triton.Config]:
    """Every combination, num_stages varying slowest (in its listed order)."""
    meta = [k for k in grid if k.startswith("BLOCK")]
    return [triton.Config(dict(zip(meta, vals[1:-1])), num_warps=vals[-1], num_stages=vals[0])
            for vals in itertools.product(grid["num_stages"], *(grid[k] for k in meta), grid["num_warps"])]


def signature(cfg: triton.Config) -> tuple:
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def label(cfg: triton.Config) -> str:
    tiles = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in cfg.kwargs.items())
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}"


def kernel_us(step, name: str, calls: int = 5) -> tuple[float, int]:
    """GPU µs per step of the kernels named ``name`` and their launches per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    hits = [e for e in prof.key_averages() if name in e.key]
    return sum(e.device_time_total for e in hits) / calls, sum(e.count for e in hits) // calls


def sweep(name: str, step, ref: tuple, tol: float, on_gpu: bool, deadline: float) -> tuple[list[dict], bool]:
    """Time every config of kernel ``name``; prints a row as each completes. Returns the rows and
    whether the CUDA context was lost (a faulting config: nothing later can run)."""
    module, attr, grid, tiny_grid = KERNELS[name]
    tuner = getattr(module, attr)
    kname = tuner.base_fn.__name__
    chosen = {signature(c) for c in tuner.cache.values()} or {signature(tuner.configs[0])}
    candidates = list(tuner.configs) + grid_configs(grid if on_gpu else tiny_grid)
    seen, rows = set(), []
    original, original_cache = tuner.configs, dict(tuner.cache)
    try:
        for cfg in candidates:
            if signature(cfg) in seen:
                continue
            seen.add(signature(cfg))
            if time.time() > deadline:
                left = len({signature(c) for c in candidates} - seen) + 1
                print(f"| {name} | (time budget spent: {left} configs not run) |", flush=True)
                break
            tuner.configs, tuner.cache = [cfg], {}
            row = {"cfg": cfg, "mark": "*" if signature(cfg) in chosen else "", "us": None, "n": "-", "ms": None}
            began = time.time()
            try:
                got = step()  # compiles, warms up
                row["rel"] = max_rel_diff(ref, got)
                if on_gpu:
                    row["us"], row["n"] = kernel_us(step, kname)
                    row["ms"] = time_eager(step)
            except Exception as e:  # out of resources, compile errors: next config
                row["fail"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:70] if str(e).strip() else ''}"
                if on_gpu:
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # a sticky CUDA error
                        print(f"| {name} | {label(cfg)} | CUDA context lost, stopping |", flush=True)
                        return rows, True
            row["s"] = time.time() - began
            rows.append(row)
            print(format_row(name, row, tol), flush=True)
    finally:
        tuner.configs, tuner.cache = original, original_cache
    return rows, False


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_row(name: str, row: dict, tol: float) -> str:
    if "fail" in row:
        return f"| {name} | {label(row['cfg'])}{row['mark']} | failed: {row['fail']} |"
    bad = "!" if row["rel"] > tol else ""
    return (f"| {name} | {label(row['cfg'])}{row['mark']} | {fmt(row['us'], '.0f')} | {row['n']} | "
            f"{fmt(row['ms'], '.3f')} | {row['rel']:.0e}{bad} | {row['s']:.0f} |")


def summary(name: str, rows: list[dict], tol: float) -> str:
    ok = [r for r in rows if "fail" not in r and r["rel"] <= tol]
    ok.sort(key=lambda r: (r["us"] is None, r["us"] or 0.0))
    best = ok[:5] + [r for r in ok[5:] if r["mark"]]
    lines = [f"\n{name}: best of {len(ok)} correct ({len(rows)} run, {sum('fail' in r for r in rows)} failed;"
             f" * = autotuned default)", HEADER, SEP, *(format_row(name, r, tol) for r in best)]
    tuples = [(*r["cfg"].kwargs.values(), r["cfg"].num_warps, r["cfg"].num_stages) for r in ok[:5]]
    return "\n".join([*lines, f"{name} top-5 (tiles..., warps, stages): {tuples}"])


HEADER = "| kernel | config | kern us | n | step ms | maxrel | s |"
SEP = "|---|---|---|---|---|---|---|"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="S1", help="S1, S2, S3 (benchmarks/_harness.py) or tiny (interpreter)")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--max-seconds", type=float, default=420.0)
    args = ap.parse_args(argv)
    start = time.time()
    on_gpu = args.shape != "tiny"
    if on_gpu:
        t, chunk, tol = make_inputs(SSD_SHAPES[args.shape]), 256, 3e-2
    else:
        t, chunk, tol = make_inputs(TINY, device="cpu", dtype=torch.float32), 32, 1e-4
    step = make_step(t, chunk)
    ref = step()  # autotunes every kernel over its own _CONFIGS: the defaults
    if on_gpu:
        torch.cuda.synchronize()
        print(f"{torch.cuda.get_device_name()} · {args.shape} · default step {time_eager(step):.3f} ms", flush=True)
    print(HEADER + "\n" + SEP, flush=True)
    names = args.kernels.split(",")
    summaries = []
    for i, name in enumerate(names):
        left = args.max_seconds - (time.time() - start)
        rows, lost = sweep(name, step, ref, tol, on_gpu, deadline=time.time() + left / (len(names) - i))
        summaries.append(summary(name, rows, tol))
        if lost:
            break
    print("\n".join(summaries), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
