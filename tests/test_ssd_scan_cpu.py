"""The sequential SSD scan in C (kernels/ssd/scan_cpu.py): the "torch" backend's path for calls
without gradients on a CPU, against the sequential reference; its dispatch and its fallback."""

import logging

import pytest
import torch

import streamssm.kernels.cpu_library as cpu_library
import streamssm.kernels.ssd.scan_cpu as scan_cpu
from streamssm.kernels import ssd_scan, ssd_scan_pool
from streamssm.kernels.ssd.reference import ssd_scan_ref
from streamssm.testing import assert_close, torch_threads
from test_chunked_torch import ssd_inputs

needs_compiler = pytest.mark.skipif(scan_cpu.library() is None, reason="no C++ compiler builds the CPU scan here")


def inputs(b, l, h, p, g, n, seed, rows=None):
    """test_chunked_torch's SSD inputs (D per head, z, dt bias, initial states) from a seed."""
    return ssd_inputs(b, l, h, p, g, n, torch.Generator().manual_seed(seed), rows=rows)


def spy_sequential(monkeypatch) -> list[tuple]:
    """Record the x shapes the C scan runs on."""
    calls = []
    scan = scan_cpu.scan_into
    monkeypatch.setattr(scan_cpu, "scan_into", lambda *a, **k: calls.append(tuple(a[1].shape)) or scan(*a, **k))
    return calls


@needs_compiler
@pytest.mark.parametrize("b, l, h, p, g, n, d_hp", [
    (2, 37, 4, 16, 2, 16, False),  # the state in registers (n = 16, p = 16, >= 8 steps)
    (1, 130, 2, 32, 1, 16, True),  # registers, two blocks of 16 channels, three blocks of steps
    (2, 37, 2, 16, 1, 24, False),  # the transposed walk (>= 8 steps, n < 64), 16 channels a vector
    (1, 1, 3, 5, 1, 7, True),  # one step: the state in place
    (3, 70, 6, 8, 3, 4, False),  # transposed, channels one by one (p < 16); dt blocks of 64 and a rest
    (1, 40, 2, 40, 1, 8, True),  # transposed, two vectors of channels and 8 more
    (2, 20, 2, 33, 1, 64, False),  # a long state row (n >= 64): in place at 20 steps
    (2, 4, 2, 16, 1, 16, False),  # a short segment (< 8 steps), n = 16: rows of 16, summed by a tree
    (3, 1, 2, 32, 1, 16, True),  # one step (the engine's), rows of 16, two blocks of 16 channels
    (1, 3, 2, 24, 1, 16, False),  # n = 16 with p not a multiple of 16: in place
])
def test_sequential_scan_matches_reference(monkeypatch, b, l, h, p, g, n, d_hp):
    """Outputs and final states (D per head or per channel, z, dt bias and softplus; groups; odd
    sizes; one step; each way of walking the state) equal the sequential reference's; the caller's
    initial state is left as it was."""
    calls = spy_sequential(monkeypatch)
    t = ssd_inputs(b, l, h, p, g, n, torch.Generator().manual_seed(b * l), d_per_headdim=d_hp)
    before = t["initial_state"].clone()
    expected = ssd_scan_ref(**t, dt_softplus=True, return_final_state=True)
    with torch.no_grad():
        got = ssd_scan(**t, chunk_size=16, dt_softplus=True, return_final_state=True, backend="torch")
    assert calls == [(b, l, h, p)]
    assert_close("sequential y", expected[0], got[0])
    assert_close("sequential final state", expected[1], got[1])
    assert torch.equal(t["initial_state"], before)


@needs_compiler
def test_sequential_scan_with_input_weights_and_packed_sequences(monkeypatch):
    """Mamba-3's input weights in place of dt, and packed sequences (one C call each, an empty one
    passing its state through)."""
    calls = spy_sequential(monkeypatch)
    t = inputs(1, 30, 4, 8, 1, 8, seed=3, rows=3)
    w = torch.rand(1, 30, 4, generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 12, 12, 30])
    expected = ssd_scan_ref(**t, input_weight=w, cu_seqlens=cu, return_final_state=True)
    with torch.no_grad():
        got = ssd_scan(**t, chunk_size=8, input_weight=w, cu_seqlens=cu, return_final_state=True, backend="torch")
    assert calls == [(1, 12, 4, 8), (1, 18, 4, 8)]
    assert_close("packed y", expected[0], got[0])
    assert_close("packed final states", expected[1], got[1])


@needs_compiler
def test_sequential_scan_reads_and_writes_pool_rows(monkeypatch):
    """ssd_scan_pool on the CPU (the Streamer's chunked calls): the rows named scan sequentially,
    the others stay bit for bit."""
    calls = spy_sequential(monkeypatch)
    t = inputs(3, 21, 4, 8, 2, 8, seed=5)
    pool = torch.randn(6, 4, 8, 8)
    rows = torch.tensor([4, 0, 2])
    expected = ssd_scan_ref(**{**t, "initial_state": pool[rows]}, return_final_state=True)
    kept = pool.clone()
    y = ssd_scan_pool(pool, *(t[k] for k in ("x", "dt", "A", "B", "C")), chunk_size=8, D=t["D"], z=t["z"],
                      dt_bias=t["dt_bias"], state_indices=rows, backend="torch")
    assert calls == [(3, 21, 4, 8)]
    assert_close("pool y", expected[0], y)
    assert_close("pool rows", expected[1], pool[rows])
    idle = torch.tensor([1, 3, 5])
    assert torch.equal(pool[idle], kept[idle])


@needs_compiler
def test_gradients_take_the_chunked_scan(monkeypatch):
    """A call with an input that needs a gradient runs the chunked scan (the C scan has no backward)."""
    calls = spy_sequential(monkeypatch)
    t = inputs(2, 9, 2, 4, 1, 4, seed=6)
    t["B"].requires_grad_(True)
    y = ssd_scan(**t, chunk_size=4, backend="torch")
    y.sum().backward()
    assert calls == [] and t["B"].grad is not None
    with torch.no_grad():
        ssd_scan(**t, chunk_size=4, backend="torch")
    assert calls == [(2, 9, 2, 4)]


def test_no_compiler_falls_back_to_the_chunked_scan(monkeypatch, caplog):
    """Where no C++ compiler builds the library, library() is None (a warning names why) and calls
    run the chunked scan, with the same results."""
    monkeypatch.setattr(cpu_library, "compiler", lambda: None)
    scan_cpu.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_library.__name__):
            assert scan_cpu.library() is None
        assert "no C++ compiler" in caplog.text
        calls = spy_sequential(monkeypatch)
        t = inputs(2, 19, 2, 4, 1, 4, seed=7)
        expected = ssd_scan_ref(**t, return_final_state=True)
        with torch.no_grad():
            got = ssd_scan(**t, chunk_size=4, return_final_state=True, backend="torch")
        assert calls == []
        assert_close("fallback y", expected[0], got[0])
        assert_close("fallback final state", expected[1], got[1])
    finally:
        scan_cpu.library.cache_clear()


@needs_compiler
def test_threads_give_the_same_bits():
    """The (sequence, head) pairs split over torch's threads (2 here, ~1M flops each): every pair is
    computed as on one thread, so the results are bit for bit the same."""
    t = inputs(2, 64, 8, 16, 2, 64, seed=8)
    results = []
    for threads in (1, 2):
        with torch_threads(threads), torch.no_grad():
            results.append(ssd_scan(**t, chunk_size=16, dt_softplus=True, return_final_state=True, backend="torch"))
    assert all(torch.equal(a, b) for a, b in zip(*results))
