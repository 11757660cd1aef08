"""sweep_ssd_configs runs end to end in the interpreter: each config of a kernel forced in turn,
its results compared with the autotuned default's, a summary of the correct ones."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.timeout(300)
def test_sweep_forces_each_config_and_checks_its_results(capsys):
    import sweep_ssd_configs

    from streamssm.kernels.ssd import chunk_scan_bwd

    before = chunk_scan_bwd._chunk_scan_bwd_dc_kernel.configs
    assert sweep_ssd_configs.main(["--shape", "tiny", "--kernels", "dc"]) == 0
    out = capsys.readouterr().out
    swept, best = out.split("\ndc: best of")  # a row per config as it ran, then the summary
    rows = re.findall(r"^\| dc \| (T\d+ I\d+ w\d s\d\*?) \| - \| - \| - \| (\S+) \|", swept, re.M)
    labels = [label.rstrip("*") for label, _ in rows]
    assert len(rows) == 3 and len(set(labels)) == 3  # the default and the tiny grid, each once
    assert rows[0][1] == "0e+00"  # the default against itself
    assert all(float(rel.rstrip("!")) < 1e-4 for _, rel in rows[1:])  # other tiles: rounding only
    assert "failed:" not in swept and "(3 run, 0 failed" in best and "dc top-5" in best
    assert chunk_scan_bwd._chunk_scan_bwd_dc_kernel.configs is before  # restored
