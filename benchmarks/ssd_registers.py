"""Registers, spills and shared memory of the SSD kernels, per autotune config, on sm_90.

No GPU needed: each config is cross-compiled with Triton's bundled ptxas (``-v``) at the
benchmark sizes (chunk 256, headdim 64, dstate 128, bf16 inputs), as the GPU would build it.
A kernel that spills (bytes of local memory per thread) or fills all 255 registers runs one
block per SM: the SSD backward at S1 spilled 0.5-2 KB per thread in every config before
2026-12-07 (int64 pointer tensors held across its loops)::

    python benchmarks/ssd_registers.py                  # the backward's two kernels, every config
    python benchmarks/ssd_registers.py --kernels dc --dstate 64
    python benchmarks/ssd_registers.py --kernels fused_train,fused_serve

Kernels: ``dc`` and ``dx`` (chunk_scan_bwd.py; tile BLOCK_T x BLOCK_I), the one-pass forward
(fused_fwd.py; tile BLOCK_Q x BLOCK_P) as training runs it (``fused_train``: saving the chunk
states, dt bias and softplus, D per head) and as the engine serves it (``fused_serve``: pool rows,
packed sequences, carried states, input weights). Columns: registers per thread, spill store
bytes, shared memory bytes, warpgroup (wgmma) and warp-level (mma.sync) MMA instructions in the
PTX, layout conversions in the TTGIR.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the GPU pipeline, before Triton is imported

import triton  # noqa: E402

from streamssm.kernels.ssd import chunk_scan_bwd, fused_fwd  # noqa: E402
from streamssm.testing import compile_for_sm90, ptxas_report  # noqa: E402

# pointers that stay fp32 whatever the inputs' dtype (the others take it), and the integer ones
BWD_FP32 = {"p_cb", "p_states", "p_dstates", "p_dt_out", "p_dA_cs", "p_D", "p_ddA_cs", "p_ddt", "p_ddA_last",
            "p_dD_part", "p_ddA_row", "p_ddA_col", "p_dC"}
FUSED_FP32 = {"p_A", "p_D", "p_dt_bias", "p_init", "p_final", "p_w", "p_states"}
INT = {"p_cstart": "*i64", "p_clen": "*i32", "p_bounds": "*i32", "p_rows": "*i64", "p_seqoff": "*i32"}
_FUSED = dict(HAS_Z=False, HAS_DT_BIAS=True, DT_SOFTPLUS=True, D_KIND=1)
# name -> (autotuned kernel, its meta-parameters beside the config's, fp32 pointers)
KERNELS = {
    "dc": (chunk_scan_bwd._chunk_scan_bwd_dc_kernel, dict(ATOMIC=False, D_KIND=1), BWD_FP32),
    "dx": (chunk_scan_bwd._chunk_scan_bwd_dx_kernel, dict(ATOMIC=False, D_KIND=1), BWD_FP32),
    "fused_train": (fused_fwd._ssd_fused_fwd_kernel, dict(_FUSED, SAVE=True, HAS_BOUNDS=False, HAS_INIT=False,
                                                           HAS_W=False, HAS_ROWS=False), FUSED_FP32),
    "fused_serve": (fused_fwd._ssd_fused_fwd_kernel, dict(_FUSED, SAVE=False, HAS_BOUNDS=True, HAS_INIT=True,
                                                           HAS_W=True, HAS_ROWS=True), FUSED_FP32),
}


def report(name: str, config: triton.Config, chunk: int, headdim: int, dstate: int, dtype: str) -> dict:
    """Compile kernel ``name`` (of KERNELS) in ``config`` for sm_90 and measure the binary."""
    kernel, kernel_meta, fp32 = KERNELS[name]
    meta = {"CHUNK": chunk, "BLOCK_P": max(16, headdim), "BLOCK_N": max(16, dstate), **kernel_meta,
            "DOT_PREC": "tf32" if dtype == "bf16" else "ieee", **config.kwargs}
    half = "*bf16" if dtype == "bf16" else "*fp32"
    binary = compile_for_sm90(kernel.fn, meta, lambda a: INT.get(a) or ("*fp32" if a in fp32 else half),
                              config.num_warps, config.num_stages)
    ptx = binary.asm["ptx"]
    regs, spill = ptxas_report(ptx)
    return {"regs": regs, "spill": spill, "smem": binary.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "mma": ptx.count("mma.sync"), "convert": binary.asm["ttgir"].count("ttg.convert_layout")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="dc,dx", help=f"of {', '.join(KERNELS)}")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--configs", type=int, default=0, help="only the first N configs of each kernel (0: all)")
    args = ap.parse_args(argv)
    print(f"sm_90, chunk {args.chunk}, headdim {args.headdim}, dstate {args.dstate}, {args.dtype} inputs\n")
    print("| kernel | tile | warps | stages | regs | spill B | smem B | wgmma | mma.sync | convert_layout |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.kernels.split(","):
        for cfg in KERNELS[name][0].configs[:args.configs or None]:
            r = report(name, cfg, args.chunk, args.headdim, args.dstate, args.dtype)
            tile = " x ".join(str(v) for v in cfg.kwargs.values())
            print(f"| {name} | {tile} | {cfg.num_warps} | {cfg.num_stages} | {r['regs']} | {r['spill']} | {r['smem']} | "
                  f"{r['wgmma']} | {r['mma']} | {r['convert']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
