"""benchmarks/selective_scan_sass.py cross-compiles the Mamba-1 scan kernels for sm_90 and counts the
instructions of their loops (no GPU), with streamssm.testing's sass_loops. The script runs in its own
process: it sets TRITON_INTERPRET=0 for Triton's GPU pipeline, which imported here would switch this
process's later tests off the interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from streamssm.testing import sass_loops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "selective_scan_sass.py"

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   SHFL.BFLY PT, R2, R3, 0x1, 0x1f ;
        /*0020*/                   FFMA R4, R2, R3, R4 ;
        /*0030*/               @P0 LDG.E R5, desc[UR4][R6.64] ;
        /*0040*/              @!P1 BRA `(.L_x_1) ;
        /*0050*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0060*/                   EXIT ;
"""


def test_loops_are_the_backward_branches_with_predicated_opcodes_counted():
    """The loop runs from its label to the branch back to it, predicated instructions included; a
    forward branch closes no loop."""
    assert sass_loops(SASS, min_size=0) == [{"SHFL": 1, "FFMA": 1, "LDG": 1, "BRA": 1}]
    assert sass_loops(SASS, min_size=4) == []


def test_reports_each_loop_of_the_backward():
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the script compiles for the GPU whatever the caller runs
    done = subprocess.run([sys.executable, str(SCRIPT), "--block-d", "8"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[int(v) for v in row.split(" | ")]
            for row in re.findall(r"^\| (\d+(?: \| \d+){12}) \|$", done.stdout, re.M)]
    assert len(rows) >= 2  # the chunk walk and the reverse tiles (and the chunk loop around them)
    for block_d, regs, spill, _, size, shfl, mufu, fp32, ldg, *_ in rows:
        assert block_d == 8 and 0 < regs <= 255 and spill >= 0
        assert size > 100 and mufu > 0 and fp32 > 0 and ldg > 0  # each walks steps: exponentials, loads
    assert any(row[9] > 0 for row in rows)  # the reverse tiles add dB, dC atomically
