"""The Mamba-1 selective scan in C (kernels/mamba1/scan_cpu.py): the "torch" backend's path for
calls without gradients on a CPU, chunked and one step, against the sequential reference; its
dispatch and fallback."""

import pytest
import torch

import streamssm.kernels.mamba1.scan_cpu as scan_cpu
from streamssm.kernels import selective_scan, selective_scan_step
from streamssm.kernels.mamba1.reference import selective_scan_ref
from streamssm.testing import assert_close, torch_threads

needs_compiler = pytest.mark.skipif(scan_cpu.library() is None, reason="no C++ compiler builds the CPU scan here")


def spy(monkeypatch) -> list[tuple]:
    calls, fn = [], scan_cpu.selective_scan_cpu
    monkeypatch.setattr(scan_cpu, "selective_scan_cpu",
                        lambda u, *a, **k: calls.append(tuple(u.shape)) or fn(u, *a, **k))
    return calls


def inputs(b, l, d, n, groups=0, seed=0, channel_last=True):
    """u, delta, z (b, d, l) as the blocks pass them (views of channel-last tensors) or contiguous;
    B, C (b, n, l), or (b, groups, n, l); A, D, delta_bias, initial_state."""
    gen = torch.Generator().manual_seed(seed)

    def seq(*lead, scale=1.0, shift=0.0):  # (*lead, l) with the time axis last
        t = torch.randn(*lead[:1], l, *lead[1:], generator=gen) * scale + shift
        t = t.movedim(1, -1)
        return t if channel_last else t.contiguous()

    bc = (b, groups, n) if groups else (b, n)
    return dict(u=seq(b, d), delta=seq(b, d, scale=0.5, shift=-2.0), A=-torch.rand(d, n, generator=gen) * 2 - 0.1,
                B=seq(*bc), C=seq(*bc), D=torch.randn(d, generator=gen), z=seq(b, d),
                delta_bias=torch.randn(d, generator=gen) * 0.1, initial_state=torch.randn(b, d, n, generator=gen))


@needs_compiler
@pytest.mark.parametrize("b, l, d, n, groups, channel_last", [
    (2, 37, 20, 16, 0, True),  # a block of 16 channels and a partial one of 4
    (1, 70, 32, 16, 2, True),  # two groups of 16 channels
    (2, 9, 33, 5, 0, False),  # time-contiguous inputs (copied), n < 16
    (1, 1, 16, 40, 0, True),  # one step, a long state row
])
def test_c_scan_matches_reference(monkeypatch, b, l, d, n, groups, channel_last):
    """Outputs and final states equal the reference's (D, z, delta bias and softplus); the initial
    state is left as it was."""
    calls = spy(monkeypatch)
    t = inputs(b, l, d, n, groups, seed=b * l * d, channel_last=channel_last)
    before = t["initial_state"].clone()
    want = selective_scan_ref(**t, delta_softplus=True, return_final_state=True)
    with torch.no_grad():
        got = selective_scan(**t, delta_softplus=True, return_final_state=True, backend="torch")
    assert calls == [(b, d, l)]
    assert_close("selective y", want[0], got[0])
    assert_close("selective final state", want[1], got[1])
    assert torch.equal(t["initial_state"], before)


@needs_compiler
def test_without_options_and_in_bf16(monkeypatch):
    """No D, z, bias, softplus or initial state; bf16 inputs computed in fp32, y back in bf16."""
    calls = spy(monkeypatch)
    t = inputs(1, 12, 24, 8, seed=3)
    for key in ("D", "z", "delta_bias", "initial_state"):
        t.pop(key)
    t["delta"] = t["delta"].abs() * 0.1
    with torch.no_grad():
        assert_close("plain y", selective_scan_ref(**t), selective_scan(**t, backend="torch"))
        low = {k: v.bfloat16() if k in ("u", "delta", "B", "C") else v for k, v in t.items()}
        y = selective_scan(**low, backend="torch")
    assert y.dtype == torch.bfloat16 and calls == [(1, 24, 12), (1, 24, 12)]
    assert_close("bf16 y", selective_scan_ref(**low).float(), y.float(), rtol=1.6e-2, atol=1.6e-2)


@needs_compiler
def test_gradients_and_split_groups_take_the_chunked_scan(monkeypatch):
    """A call that records gradients, or whose B/C groups split a block of 16 channels (d / g = 12),
    runs the chunked scan."""
    calls = spy(monkeypatch)
    t = inputs(1, 10, 16, 4, seed=4)
    t["u"].requires_grad_(True)
    selective_scan(**t, backend="torch").sum().backward()
    assert t["u"].grad is not None
    split = inputs(1, 10, 24, 4, groups=2, seed=5)
    with torch.no_grad():
        assert_close("split groups", selective_scan_ref(**split), selective_scan(**split, backend="torch"))
    assert calls == []


def test_no_library_runs_the_chunked_scan(monkeypatch):
    monkeypatch.setattr(scan_cpu, "library", lambda: None)
    calls = spy(monkeypatch)
    t = inputs(1, 10, 16, 4, seed=6)
    with torch.no_grad():
        assert_close("fallback", selective_scan_ref(**t), selective_scan(**t, backend="torch"))
    assert calls == []


@needs_compiler
def test_threads_give_the_same_bits():
    """The (sequence, block of 16 channels) pairs split over torch's threads: the same bits as one."""
    t = inputs(2, 64, 64, 16, seed=7)
    results = []
    for threads in (1, 2):
        with torch_threads(threads), torch.no_grad():
            results.append(selective_scan(**t, delta_softplus=True, return_final_state=True, backend="torch"))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def step_spy(monkeypatch) -> list[tuple]:
    calls, fn = [], scan_cpu.selective_scan_step_c
    monkeypatch.setattr(scan_cpu, "selective_scan_step_c",
                        lambda state, u, *a: calls.append(tuple(u.shape)) or fn(state, u, *a))
    return calls


@needs_compiler
@pytest.mark.parametrize("d, n, groups, options", [
    (32, 16, 0, True),  # two blocks of 16 channels, D, z, delta bias and softplus
    (64, 32, 2, True),  # two groups of 32 channels, a state row of two vectors
    (16, 16, 0, False),  # no D, z, bias or softplus
])
def test_c_steps_match_the_reference_and_the_c_scan(monkeypatch, d, n, groups, options):
    """The C step (d and n multiples of 16), token by token on a pool updated in place, equals the
    reference scan and the C scan over the whole sequence (to fp32 rounding)."""
    calls = step_spy(monkeypatch)
    b, l = 3, 6
    t = inputs(b, l, d, n, groups, seed=d + n)
    kw = dict(D=t["D"], z=t["z"], delta_bias=t["delta_bias"], delta_softplus=True) if options else {}
    seq = dict(u=t["u"], delta=t["delta"], A=t["A"], B=t["B"], C=t["C"], initial_state=t["initial_state"])
    want = selective_scan_ref(**seq, **kw, return_final_state=True)
    with torch.no_grad():
        scanned = selective_scan(**seq, **kw, return_final_state=True, backend="torch")
        pool = t["initial_state"].clone()
        ys = [selective_scan_step(pool, t["u"][..., i], t["delta"][..., i], t["A"], t["B"][..., i], t["C"][..., i],
                                  **{**kw, **({"z": kw["z"][..., i]} if options else {})}, backend="torch")
              for i in range(l)]
    assert calls == [(b, d)] * l
    y = torch.stack(ys, dim=-1)
    for name, expected in (("reference", want), ("C scan", scanned)):
        assert_close(f"stepped y vs the {name}", expected[0], y)
        assert_close(f"stepped state vs the {name}", expected[1], pool)


@needs_compiler
def test_steps_that_do_not_suit_the_c_step_take_the_ops(monkeypatch):
    """d or n not a multiple of 16, groups that split a block of 16 channels, B/C groups apart in
    memory, bf16: the PyTorch ops (the reference's results)."""
    calls = step_spy(monkeypatch)
    for d, n, groups, dtype, spread in [(20, 16, 0, torch.float32, False), (32, 8, 0, torch.float32, False),
                                        (32, 16, 4, torch.float32, False), (32, 16, 2, torch.float32, True),
                                        (32, 16, 0, torch.bfloat16, False)]:
        t = inputs(2, 1, d, n, groups, seed=d)
        args = [t[k][..., 0].to(dtype) for k in ("u", "delta")] + [t["A"]] + [t[k][..., 0].to(dtype) for k in "BC"]
        if spread:  # (b, g, n) views with their groups 2n apart
            args[3:5] = [torch.cat([m, m], dim=-1)[..., :n] for m in args[3:5]]
        pool, ref_pool = t["initial_state"].clone(), t["initial_state"].clone()
        with torch.no_grad():
            got = selective_scan_step(pool, *args, D=t["D"], delta_softplus=True, backend="torch")
            want = selective_scan_step(ref_pool, *args, D=t["D"], delta_softplus=True, backend="reference")
        assert_close(f"step d{d} n{n} g{groups} {dtype}", want, got, dtype)
    assert calls == []
