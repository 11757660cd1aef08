"""`streamssm demo --quick` end to end: train, serve, stream, zarr, plots; parity asserted."""

import re
import subprocess
import sys

import numpy as np
import pytest
from rich.progress import Progress

from streamssm.commands.demo import main, output_folder
from streamssm.demo import QUICK, DemoParityError, max_difference, run_task


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
    # one progress line per stage, in order, with the time since the demo started
    stages = re.findall(r"task 1 of 1 \(sensor\): (.+?) · \d+ s elapsed", out)
    assert stages == ["generating data", f"training {QUICK.train_steps} steps",
                      f"streaming {-(-QUICK.held_out // QUICK.chunk)} chunks through the websocket service",
                      "zarr batch inference", "plots"]
    # Lightning's bar counts steps of max_steps; no `Epoch k/-2`, no v_num
    assert f"{QUICK.train_steps}/{QUICK.train_steps}" in out and "· step" in out
    assert not re.search(r"Epoch \d+/-\d", out) and "v_num" not in out


def test_console_script_lists_demo():
    result = subprocess.run([sys.executable, "-m", "streamssm", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


def test_forecast_figure_zooms_and_splits_channels():
    from streamssm.stream_plots import forecast_figure

    signal = np.random.default_rng(0).normal(size=(1000, 5)).astype(np.float32)
    fig = forecast_figure(signal, signal, title="t", zoom=200)
    assert len(fig.axes) == 3  # one panel per channel, at most 3
    assert [ax.get_ylabel() for ax in fig.axes] == ["channel 0", "channel 1", "channel 2"]
    x = fig.axes[0].get_lines()[0].get_xdata()
    assert len(x) == 200 and x[0] == 800 and x[-1] == 999
    assert fig.axes[-1].get_xlabel() == "step (last 200 of 1000 steps, first 3 of 5 channels)"
    audio = forecast_figure(signal[:, 0], signal[:, 0], zoom=None, sample_rate=8000)
    assert audio.axes[-1].get_xlabel() == "time (s) (all 1000 steps)"
    assert audio.axes[0].get_lines()[0].get_xdata()[-1] == pytest.approx(999 / 8000)


def test_surprisal_figure_units():
    from streamssm.stream_plots import surprisal_figure

    bits = np.full(800, 7.5)
    fig = surprisal_figure(bits, signal=np.zeros(800), uniform_bits=8.0, sample_rate=8000, step_unit="sample")
    signal_ax, bits_ax = fig.axes
    assert bits_ax.get_xlabel() == "time (s)" and bits_ax.get_ylabel() == "surprisal (bits per sample)"
    assert bits_ax.get_lines()[0].get_xdata()[-1] == pytest.approx(799 / 8000)
    dna = surprisal_figure(bits, step_unit="base")
    assert dna.axes[0].get_xlabel() == "base" and dna.axes[0].get_ylabel() == "surprisal (bits per base)"


def test_a_quick_run_leaves_a_full_runs_models_in_place(tmp_path, monkeypatch):
    """Regression (README walk): `demo --quick` wrote ./demo_out/sensor/model.ckpt over the full run's
    model that the README's `infer` example reads."""
    monkeypatch.chdir(tmp_path)
    assert output_folder(None, quick=False) == tmp_path / "demo_out"
    assert output_folder(None, quick=True) == tmp_path / "demo_out" / "quick"
    assert output_folder("elsewhere", quick=True) == tmp_path / "elsewhere"
