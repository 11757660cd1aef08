"""What a command prints, from a real process (pytest's own log handlers would hide the bug).

Regression (issue 18): every Lightning line of `streamssm infer` was printed twice (Lightning's
console handler plus the CLI's root handler), with a logger tip and a LeafSpec warning."""

import os
import subprocess
import sys

import numpy as np
import zarr

from streamssm.checkpoint import export_safetensors
from streamssm.models import ModelConfig, SSMModel


def test_infer_prints_each_line_once_without_tips(tmp_path):
    cfg = ModelConfig(block="mamba2", d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4,
                      input_kind="continuous", input_dim=2, head="regression", output_dim=2)
    model = export_safetensors(SSMModel(cfg), tmp_path / "m.safetensors",
                               spec={"modality": "sensor", "channels": ["a", "b"], "mean": [0, 0], "std": [1, 1]})
    arr = zarr.create_array(tmp_path / "in.zarr", shape=(2, 64, 2), chunks=(1, 32, 2), dtype="float32")
    arr[:] = np.random.default_rng(0).normal(size=(2, 64, 2)).astype(np.float32)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-W", "default", "-m", "streamssm", "infer", "--checkpoint", str(model),
         "--input", str(tmp_path / "in.zarr"), "--output", str(tmp_path / "out.zarr"),
         "--series-axis", "0", "--time-axis", "1", "--channel-axis", "2"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert sum("GPU available" in line for line in lines) == 1, run.stderr
    assert sum("wrote" in line for line in lines) == 1, run.stderr
    assert not any("Tip" in line or "LeafSpec" in line for line in lines), run.stderr


def test_output_cut_short_by_the_reader_is_not_an_error(tmp_path):
    """`streamssm info MODEL | head` printed 'error: Broken pipe' (issue 18 README walk)."""
    cfg = ModelConfig(block="mamba2", d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4,
                      input_kind="tokens", vocab_size=5, head="lm")
    model = export_safetensors(SSMModel(cfg), tmp_path / "m.safetensors", spec={"modality": "dna"})
    run = subprocess.run(f"{sys.executable} -m streamssm info {model} | true", shell=True,  # reader gone first
                         capture_output=True, text=True, timeout=120)
    assert "error" not in run.stderr and "Traceback" not in run.stderr, run.stderr
