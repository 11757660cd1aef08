"""`streamssm demo --quick` end to end: train, serve, stream, zarr, plots; parity asserted."""

import subprocess
import sys

import numpy as np
import pytest
from rich.progress import Progress

from streamssm.demo import QUICK, DemoParityError, main, max_difference, run_task


@pytest.mark.parametrize("task", ["sensor", "dna", "audio"])
def test_demo_task_end_to_end(task, tmp_path):
    with Progress(disable=True) as progress:
        row = run_task(task, tmp_path, QUICK, "cpu", progress)
    assert row["stream_diff"] <= 1e-3 and row["zarr_diff"] <= 1e-3
    assert row["summary"]["type"] == "summary"
    assert row["chunks"] == -(-QUICK.held_out // QUICK.chunk)
    for png in row["plots"]:
        assert png.stat().st_size > 10_000  # a real picture, not an empty canvas
    if task in ("sensor", "dna"):  # learnable in a dozen steps: beats the no-model baseline
        assert row["model"] < row["baseline"]


def test_parity_check_fails_loudly():
    ok = np.linspace(0, 1, 10)
    assert max_difference("x", ok, ok + 1e-6) == pytest.approx(1e-6)
    with pytest.raises(DemoParityError, match="x: max difference"):
        max_difference("x", ok, ok + 1e-2)
    with pytest.raises(DemoParityError, match="shapes differ"):
        max_difference("x", ok, ok[:5])


def test_demo_cli_summary_table(tmp_path, capsys):
    assert main(["--task", "sensor", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "streamssm demo" in out and "stream diff" in out
    assert (tmp_path / "sensor" / "stream.png").is_file()


def test_console_script_lists_demo():
    result = subprocess.run([sys.executable, "-m", "streamssm", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout
