"""Instruction mix of the Mamba-1 scan kernels' loops on sm_90, per BLOCK_D (no GPU).

Each config is cross-compiled with Triton's bundled ptxas as a launch at M1 would build it
(bf16 u / delta / dy, n 16, chunk 64, no z, every integer argument a multiple of 16) and
disassembled with its nvdisasm. A loop is a backward branch; per loop of more than 100
instructions (the backward: the chunk walk, the reverse tiles, and the chunk loop holding both;
the forward: the tile loop) the table gives its instructions and the kinds that cost most there:
shuffles (sums across threads), exponentials, fp32 arithmetic, global loads and atomics, shared
memory and barriers (layout conversions), local memory (spills). At M1 the backward's reverse tile
(BLOCK_D 16, 4 steps) was ~1,700 instructions, 312 of them shuffles and 123 scalar loads::

    python benchmarks/selective_scan_sass.py                      # the backward, BLOCK_D 32 / 16 / 8
    python benchmarks/selective_scan_sass.py --kernel fwd --block-d 8
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the GPU pipeline, before Triton is imported

from streamssm.kernels.mamba1 import scan  # noqa: E402
from streamssm.testing import compile_for_sm90, ptxas_report, sass_loops, sass_of  # noqa: E402

HALF = {"p_u", "p_delta", "p_z", "p_y", "p_du", "p_ddelta", "p_dz", "p_dy"}
# the SASS opcodes (before the first dot) of each column
KINDS = {"SHFL": ("SHFL",), "MUFU": ("MUFU",), "fp32": ("FFMA", "FMUL", "FADD"), "LDG": ("LDG",),
         "REDG": ("REDG", "RED", "ATOMG"), "STS/LDS": ("STS", "LDS"), "BAR": ("BAR",), "LDL/STL": ("LDL", "STL")}


def compile_kernel(kernel: str, block_d: int, tb: int):
    """The backward (``bwd``, reverse tiles of ``tb`` steps) or forward output pass (``fwd``) at
    BLOCK_D ``block_d``, compiled for sm_90 as at M1."""
    meta = dict(HAS_D=True, HAS_Z=False, HAS_BIAS=True, SOFTPLUS=True, T=scan.CHUNK_GPU, TT=8, N_PAD=16,
                s_ul=1, s_dl=1, s_zl=1, s_An=1, BLOCK_D=block_d)
    if kernel == "bwd":
        fn, meta = scan._selective_scan_bwd_kernel.fn, {**meta, "TB": tb, "PF_AHEAD": scan.BWD_PREFETCH_TILES}
    else:
        fn, meta = scan._selective_scan_fwd_kernel.fn, {**meta, "STATE_ONLY": False, "STORE_CKPT": True}
    return compile_for_sm90(fn, meta, lambda a: "*bf16" if a in HALF else "*fp32", 1, 1, aligned=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("bwd", "fwd"), default="bwd")
    ap.add_argument("--block-d", default="32,16,8", help="BLOCK_D values, comma-separated")
    ap.add_argument("--tb", type=int, default=4, help="steps of the backward's reverse tiles")
    args = ap.parse_args(argv)
    print(f"sm_90, {args.kernel}, bf16, n 16, chunk {scan.CHUNK_GPU}, reverse tiles {args.tb} steps, aligned\n")
    print(f"| BLOCK_D | regs | spill B | loop | instructions | {' | '.join(KINDS)} |")
    print("|---|---|---|---|---|" + "---|" * len(KINDS))
    for block_d in (int(v) for v in args.block_d.split(",")):
        binary = compile_kernel(args.kernel, block_d, args.tb)
        regs, spill = ptxas_report(binary.asm["ptx"])
        for i, ops in enumerate(sass_loops(sass_of(binary.asm["cubin"]))):
            kinds = " | ".join(str(sum(ops[o] for o in opcodes)) for opcodes in KINDS.values())
            print(f"| {block_d} | {regs} | {spill} | {i} | {sum(ops.values())} | {kinds} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
