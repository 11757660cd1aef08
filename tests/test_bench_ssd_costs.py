"""bench_ssd's byte floors count the tensors a step must move: the forward reads x, dt, B, C and
writes y; forward + backward also reads them again and dy, and writes dx, ddt, dB, dC."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_byte_floors_are_the_bytes_of_the_tensors_moved():
    import bench_ssd

    shape = dict(batch=2, length=64, heads=3, headdim=8, dstate=4)
    t = bench_ssd.make_inputs(shape, device="cpu")
    big = [t[k] for k in ("x", "dt", "B", "C")]  # the per-token tensors; A, D, dt_bias are per head
    size = sum(v.numel() * v.element_size() for v in big)
    y_bytes = t["x"].numel() * t["x"].element_size()
    flops, fwd_bytes = bench_ssd.forward_cost(shape)
    train_flops, train_bytes = bench_ssd.train_cost(shape)
    assert fwd_bytes == size + y_bytes  # read the inputs, write y
    assert train_bytes == 2 * size + 2 * y_bytes + size  # both passes read them, y and dy, the gradients
    assert train_flops == 3 * flops and flops > 0
    assert all(v.dtype == torch.bfloat16 for v in big)
