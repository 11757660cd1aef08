"""Step latency over a state pool: our Triton step kernels vs mamba-ssm and the PyTorch reference.

Run on a GPU (peer importable as ``mamba_ssm.ops.triton.selective_state_update``, e.g. the sdist's
files with the package ``__init__`` stubbed, on PYTHONPATH):

    python benchmarks/bench_step.py [--batches 1,8,64,256,512] [--no-verify] [--sweep] [--model]

One time step of B live streams whose states sit at random rows of a pool of 2B rows (fp32 state,
bf16 inputs), shapes of shared/BENCHMARKS.md:
    ssd     Mamba-2 layer: heads 24, headdim 64, dstate 128 (ours ``ssd_step``)
    mamba1  Mamba-1 layer: dim 1536, dstate 16               (ours ``selective_scan_step``)
Providers: ours (the public op, Triton backend), peer (mamba-ssm ``selective_state_update`` with
``state_batch_indices``; Mamba-2 layout with tied head dims), ref (the public op,
``backend="reference"``: index_select, PyTorch math, index_copy_), floor (a device copy of the B
rows' state bytes: the read+write memory floor). Each is timed eager (a loop of calls; host
overhead included) and replayed from a CUDA graph of 20 calls (GPU time alone): µs per call,
median of 5 repeats after warm-up, L2 not flushed. Ratios > 1 mean we are faster.
``--model`` adds a whole-model step (4-layer d_model 512 Mamba-2, our ``step_pool``) eager,
in one CUDA graph, and through ``Streamer.feed_many`` with one-sample chunks, next to the same
model (same weights) stacked from mamba-ssm ``Mamba2`` modules with their ``step``
(``benchmarks/_peers.py``; needs einops and the sdist under .peers/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess

import torch

from streamssm.kernels import selective_scan_step, ssd_step
from streamssm.testing import assert_close

GRAPH_CALLS = 20
REPEATS = 5
BF16 = torch.bfloat16
DEV = "cuda"


# ----------------------------------------------------------------------------- timing


def _events_us(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _iters_for(fn, target_us: float = 20_000.0) -> int:
    one = _events_us(fn, 3)
    return max(3, min(300, int(target_us / max(one, 1e-3))))


def time_eager(fn) -> float:
    """µs per call of ``fn`` called in a Python loop (median of REPEATS)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    iters = _iters_for(fn)
    return statistics.median(_events_us(fn, iters) for _ in range(REPEATS))


def time_graph(fn) -> float:
    """µs per call of ``fn`` replayed from a CUDA graph holding GRAPH_CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    replay = graph.replay
    replay()
    torch.cuda.synchronize()
    iters = _iters_for(replay)
    return statistics.median(_events_us(replay, iters) for _ in range(REPEATS)) / GRAPH_CALLS


# ----------------------------------------------------------------------------- problems


def _peer():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except ImportError as exc:  # the peer is optional: rows without it say so
        print(f"# peer mamba-ssm selective_state_update not importable ({exc}); peer columns empty")
        return None
    return selective_state_update


def ssd_problem(batch: int, gen: torch.Generator) -> dict:
    h, p, n = 24, 64, 128
    dev = DEV
    rows = torch.randperm(2 * batch, generator=gen)[:batch].to(dev)
    return dict(
        pool=torch.randn(2 * batch, h, p, n, generator=gen).to(dev) * 0.1,
        rows=rows,
        x=torch.randn(batch, h, p, generator=gen).to(dev, BF16),
        dt=torch.randn(batch, h, generator=gen).to(dev, BF16),
        A=-torch.rand(h, generator=gen).to(dev) * 8 - 0.5,
        B=torch.randn(batch, 1, n, generator=gen).to(dev, BF16),
        C=torch.randn(batch, 1, n, generator=gen).to(dev, BF16),
        D=torch.randn(h, generator=gen).to(dev),
        z=torch.randn(batch, h, p, generator=gen).to(dev, BF16),
        dt_bias=torch.randn(h, generator=gen).to(dev),
    )


def mamba1_problem(batch: int, gen: torch.Generator) -> dict:
    d, n = 1536, 16
    dev = DEV
    return dict(
        pool=torch.randn(2 * batch, d, n, generator=gen).to(dev) * 0.1,
        rows=torch.randperm(2 * batch, generator=gen)[:batch].to(dev),
        x=torch.randn(batch, d, generator=gen).to(dev, BF16),
        dt=torch.randn(batch, d, generator=gen).to(dev, BF16),
        A=-torch.rand(d, n, generator=gen).to(dev) * 8 - 0.5,
        B=torch.randn(batch, n, generator=gen).to(dev, BF16),
        C=torch.randn(batch, n, generator=gen).to(dev, BF16),
        D=torch.randn(d, generator=gen).to(dev),
        z=torch.randn(batch, d, generator=gen).to(dev, BF16),
        dt_bias=torch.randn(d, generator=gen).to(dev),
    )


def ours_fn(op: str, q: dict, pool: torch.Tensor, backend: str = "triton"):
    if op == "ssd":
        return lambda: ssd_step(pool, q["x"], q["dt"], q["A"], q["B"], q["C"], D=q["D"], z=q["z"],
                                dt_bias=q["dt_bias"], dt_softplus=True, state_indices=q["rows"], backend=backend)
    return lambda: selective_scan_step(pool, q["x"], q["dt"], q["A"], q["B"], q["C"], D=q["D"], z=q["z"],
                                       delta_bias=q["dt_bias"], delta_softplus=True, state_indices=q["rows"],
                                       backend=backend)


def peer_fn(peer, op: str, q: dict, pool: torch.Tensor):
    if peer is None:
        return None
    if op == "mamba1":
        return lambda: peer(pool, q["x"], q["dt"], q["A"], q["B"], q["C"], D=q["D"], z=q["z"],
                            dt_bias=q["dt_bias"], dt_softplus=True, state_batch_indices=q["rows"])
    b, h, p = q["x"].shape
    n = q["B"].shape[-1]
    # mamba-ssm's Mamba-2 layout: per-head scalars broadcast over headdim (stride 0 -> TIE_HDIM)
    A = q["A"][:, None, None].expand(h, p, n)
    dt = q["dt"][:, :, None].expand(b, h, p)
    dt_bias = q["dt_bias"][:, None].expand(h, p)
    D = q["D"][:, None].expand(h, p)
    return lambda: peer(pool, q["x"], dt, A, q["B"], q["C"], D=D, z=q["z"], dt_bias=dt_bias, dt_softplus=True,
                        state_batch_indices=q["rows"])


def floor_fn(q: dict):
    src = q["pool"][: q["rows"].shape[0]]
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def verify(op: str, q: dict, peer) -> str:
    """Outputs and updated rows of ours and the peer vs the reference, at bf16 tolerance."""
    ref_pool, our_pool = q["pool"].clone(), q["pool"].clone()
    y_ref = ours_fn(op, q, ref_pool, "reference")()
    y_our = ours_fn(op, q, our_pool)()
    assert_close(f"{op} ours y", y_ref, y_our, BF16)
    assert_close(f"{op} ours state", ref_pool, our_pool, BF16)
    msg = f"ours max|dy| {float((y_our.float() - y_ref.float()).abs().max()):.2e}"
    if peer is not None:
        peer_pool = q["pool"].clone()
        y_peer = peer_fn(peer, op, q, peer_pool)()
        assert_close(f"{op} peer y", y_ref, y_peer.reshape(y_ref.shape), BF16)
        assert_close(f"{op} peer state", ref_pool, peer_pool, BF16)
        msg += f", peer max|dy| {float((y_peer.float() - y_ref.float()).abs().max()):.2e}"
    return msg


# ----------------------------------------------------------------------------- tables


def fmt(v: float | None) -> str:
    return "–" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}x"


def bench_kernels(batches: list[int], do_verify: bool, sweep: bool) -> None:
    peer = _peer()
    gen = torch.Generator().manual_seed(0)
    print("\n## Step kernels: µs per call (eager | CUDA graph), fp32 state, bf16 inputs, random pool rows\n")
    print("| op | streams | ours eager | ours graph | peer eager | peer graph | ref eager | ref graph "
          "| floor graph | peer/ours graph | peer/ours eager | ref/ours graph | ours % of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for op, make in (("ssd", ssd_problem), ("mamba1", mamba1_problem)):
        for b in batches:
            q = make(b, gen)
            if do_verify:
                notes.append(f"verify {op} B={b}: " + verify(op, q, peer))
            pool = q["pool"].clone()
            t = {"ours_e": time_eager(ours_fn(op, q, pool)), "ours_g": time_graph(ours_fn(op, q, pool))}
            pf = peer_fn(peer, op, q, pool)
            t["peer_e"] = time_eager(pf) if pf else None
            t["peer_g"] = time_graph(pf) if pf else None
            t["ref_e"] = time_eager(ours_fn(op, q, pool, "reference"))
            t["ref_g"] = time_graph(ours_fn(op, q, pool, "reference"))
            t["floor"] = time_graph(floor_fn(q))
            print(f"| {op} | {b} | {fmt(t['ours_e'])} | {fmt(t['ours_g'])} | {fmt(t['peer_e'])} | {fmt(t['peer_g'])} "
                  f"| {fmt(t['ref_e'])} | {fmt(t['ref_g'])} | {fmt(t['floor'])} | {ratio(t['peer_g'], t['ours_g'])} "
                  f"| {ratio(t['peer_e'], t['ours_e'])} | {ratio(t['ref_g'], t['ours_g'])} "
                  f"| {100 * t['floor'] / t['ours_g']:.0f} % |", flush=True)
            del q, pool
            torch.cuda.empty_cache()
    for line in notes:
        print(f"# {line}")
    if sweep:
        from streamssm.kernels.ssd.step import ssd_step_triton

        print("\n## ssd_step headdim tile sweep (graph µs per call)\n")
        print("| streams | " + " | ".join(f"BLOCK_P {bp}" for bp in (2, 4, 8, 16, 32)) + " |")
        print("|---|" + "---|" * 5)
        for b in batches:
            q = ssd_problem(b, gen)
            pool = q["pool"]
            cells = []
            for bp in (2, 4, 8, 16, 32):
                fn = lambda bp=bp: ssd_step_triton(pool, q["x"], q["dt"], q["A"], q["B"], q["C"], q["D"], q["z"],
                                                   q["dt_bias"], True, q["rows"], block_p=bp)
                cells.append(fmt(time_graph(fn)))
            print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


def _peer_model(model):
    """The same model stacked from mamba-ssm ``Mamba2`` modules with our weights, or None."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from _peers import PeerMamba2Model

        cfg = model.cfg
        peer = PeerMamba2Model(cfg.d_model, cfg.n_layers, cfg.d_state, cfg.headdim, cfg.expand, cfg.d_conv,
                               cfg.chunk_size, input_dim=cfg.input_dim, output_dim=cfg.output_dim)
    except (ImportError, StopIteration) as exc:  # the peer is optional: its columns stay empty
        print(f"# peer model (mamba-ssm Mamba2) not importable ({exc!r}); peer columns empty")
        return None
    return peer.to("cuda", BF16).load_from(model).eval()


def bench_model(batches: list[int]) -> None:
    from streamssm.inference import Streamer
    from streamssm.models import ModelConfig, SSMModel

    cfg = ModelConfig(block="mamba2", d_model=512, n_layers=4, d_state=128, headdim=64, expand=2,
                      input_kind="continuous", input_dim=1, head="regression", output_dim=1)
    torch.manual_seed(0)
    model = SSMModel(cfg).to("cuda", BF16).eval()
    peer = _peer_model(model)
    print("\n## Whole-model step (4-layer d_model 512 Mamba-2, heads 16 x 64, dstate 128, bf16, fp32 SSM state): "
          "µs per step\n")
    print("Peer: the same model (our weights) stacked from mamba-ssm `Mamba2` modules, its `step` on contiguous "
          "per-stream states (no pool indexing).\n")
    print("| streams | ours eager | ours graph | peer eager | peer graph | peer/ours eager | peer/ours graph "
          "| Streamer.feed_many eager | Streamer.feed_many graphs | Streamer host overhead (graphs - ours graph) "
          "| stream-steps/s (ours graph) | max abs diff 16 steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b in batches:
        pool = model.init_state(2 * b, "cuda", BF16)
        rows = torch.randperm(2 * b, device="cuda")[:b]
        x = torch.randn(b, 1, device="cuda", dtype=BF16)
        t = {}
        diff = None
        with torch.no_grad():
            fn = lambda pool=pool: model.step_pool(x, pool, rows)
            t["ours_e"], t["ours_g"] = time_eager(fn), time_graph(fn)
            if peer is not None:
                states = peer.init_states(b)
                pfn = lambda: peer.step(x, states)
                t["peer_e"], t["peer_g"] = time_eager(pfn), time_graph(pfn)
                diff = _step_diff(model, peer, b)
        feed = {}
        for engine in ("eager", "graphs"):
            streamer = Streamer(model, capacity=b, device="cuda", dtype=BF16, engine=engine)
            chunks = {streamer.open(): torch.randn(1, 1) for _ in range(b)}
            feed[engine] = time_eager(lambda s=streamer: s.feed_many(chunks))
            del streamer
        print(f"| {b} | {fmt(t['ours_e'])} | {fmt(t['ours_g'])} | {fmt(t.get('peer_e'))} | {fmt(t.get('peer_g'))} "
              f"| {ratio(t.get('peer_e'), t['ours_e'])} | {ratio(t.get('peer_g'), t['ours_g'])} | {fmt(feed['eager'])} "
              f"| {fmt(feed['graphs'])} | {fmt(feed['graphs'] - t['ours_g'])} "
              f"| {b / t['ours_g'] * 1e6:,.0f} | {'–' if diff is None else f'{diff:.2e}'} |", flush=True)
        del pool
        torch.cuda.empty_cache()


@torch.no_grad()
def _step_diff(model, peer, b: int, steps: int = 16) -> float:
    """Max |ours - peer| of the outputs over ``steps`` steps of ``b`` streams from zero states."""
    pool = model.init_state(b, "cuda", BF16)
    rows = torch.arange(b, device="cuda")
    states = peer.init_states(b)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(b, 1, device="cuda", dtype=BF16)
        worst = max(worst, float((model.step_pool(x, pool, rows).float() - peer.step(x, states).float()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,64,256,512")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also sweep ssd_step's headdim tile")
    parser.add_argument("--model", action="store_true", help="also time a whole-model step")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_step needs a CUDA device")
    batches = [int(b) for b in args.batches.split(",")]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
          f"| commit {os.environ.get('STREAMSSM_COMMIT', commit) or '?'}")
    if not args.no_kernels:
        bench_kernels(batches, not args.no_verify, args.sweep)
    if args.model:
        bench_model(batches)


if __name__ == "__main__":
    main()
