"""benchmarks/ssd_registers.py cross-compiles the SSD kernels for sm_90 and reads ptxas's
register and spill counts (no GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ssd_registers.py"


def test_reports_registers_spills_and_shared_memory_per_config():
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the script compiles for the GPU whatever the caller runs
    done = subprocess.run([sys.executable, str(SCRIPT), "--kernels", "dc,dx,fused_train,fused_serve", "--configs", "1",
                           "--dstate", "64"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dstate 64, bf16" in done.stdout
    rows = re.findall(r"^\| (\w+) \| (\d+) x (\d+) \| (\d) \| (\d) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|",
                      done.stdout, re.M)
    assert [r[0] for r in rows] == ["dc", "dx", "fused_train", "fused_serve"]  # the first config of each
    for _, _, _, _, _, regs, spill, smem, wgmma, mma in rows:
        assert 0 < int(regs) <= 255 and int(spill) >= 0 and int(smem) > 0
        assert int(wgmma) + int(mma) > 0  # the kernels' products are on tensor cores
