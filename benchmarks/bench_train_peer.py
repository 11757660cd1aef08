"""Training throughput: our Mamba-2 model vs the same model built from mamba-ssm's ``Mamba2`` (GPU).

    python benchmarks/bench_train_peer.py [--d-model 768] [--layers 12] [--length 8192] [--batch 8]
                                          [--warmup 5] [--steps 20] [--rounds 2]

Both models are the same configuration (token LM, vocab 5; d_state 128, headdim 64, expand 2,
d_conv 4, chunk 256; layers of x + mixer(RMSNorm(x)), final RMSNorm, linear head): ours is
``streamssm.models.SSMModel`` (our Triton conv1d, SSD and gated norm), the peer stacks
mamba-ssm's ``Mamba2`` modules (``benchmarks/_peers.py``: its Triton SSD and gated norm,
``nn.Conv1d`` as it runs without the causal_conv1d package). One training loop drives both:
bf16 autocast over fp32 weights (what Lightning's bf16-mixed does), cross-entropy, backward,
gradient clipping at 1.0, fused AdamW; no activation checkpointing. Each step is timed with
CUDA-synchronized wall clocks; a round trains each model for ``--warmup`` untimed and
``--steps`` timed steps on the same learnable synthetic tokens (bench_train.MotifTokens);
rounds alternate ours/peer so drift hits both. Reported: median ms/step and tokens/s over all
rounds, peak memory, loss at the first and last step, and ours/peer throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, report, run_tag  # noqa: E402
from _peers import PeerMamba2Model  # noqa: E402
from bench_train import VOCAB, MotifTokens  # noqa: E402

from streamssm.models import ModelConfig, SSMModel  # noqa: E402


def build(kind: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Callable]:
    """(model on cuda with fp32 weights, forward tokens (b, l) -> logits (b, l, vocab))."""
    torch.manual_seed(0)
    shape = dict(d_model=args.d_model, n_layers=args.layers, d_state=128, headdim=64, expand=2, d_conv=4,
                 chunk_size=256)
    if kind == "ours":
        model = SSMModel(ModelConfig(block="mamba2", input_kind="tokens", vocab_size=VOCAB, head="lm", **shape))
        return model.cuda(), lambda x: model(x)[0]
    model = PeerMamba2Model(vocab_size=VOCAB, output_dim=VOCAB, **shape)
    return model.cuda(), model


def train_round(kind: str, args: argparse.Namespace, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Fresh model, ``warmup + steps`` optimizer steps; per-step seconds, losses and peak memory."""
    torch.cuda.empty_cache()
    model, forward = build(kind, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=True)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for x, y in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    del model, opt
    return {"times": times[args.warmup:], "loss first": losses[0], "loss last": losses[-1],
            "peak GiB": torch.cuda.max_memory_allocated() / 2**30, "params M": params}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per round (compile, autotune)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="ours/peer rounds, alternating")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_train_peer needs a CUDA GPU", file=sys.stderr)
        return 2
    data = MotifTokens(args.length, (args.warmup + args.steps) * args.batch)
    items = [data[i] for i in range(len(data))]
    batches = [(torch.stack([it["inputs"] for it in items[i : i + args.batch]]).cuda(),
                torch.stack([it["targets"] for it in items[i : i + args.batch]]).cuda())
               for i in range(0, len(items), args.batch)]
    results: dict[str, list[dict]] = {"ours": [], "mamba-ssm Mamba2": []}
    for r in range(args.rounds):
        for kind in (("ours", "mamba-ssm Mamba2") if r % 2 == 0 else ("mamba-ssm Mamba2", "ours")):
            res = train_round("ours" if kind == "ours" else "peer", args, batches)
            results[kind].append(res)
            print(f"round {r} {kind}: median {1e3 * statistics.median(res['times']):.1f} ms/step, "
                  f"loss {res['loss first']:.3f} -> {res['loss last']:.3f}, peak {res['peak GiB']:.1f} GiB",
                  flush=True)
    table = Table(["model", "params M", "ms/step", "tokens/s", "peak GiB", "loss first", "loss last", "ours speedup"])
    tokens = args.batch * args.length
    ms = {k: 1e3 * statistics.median(t for res in v for t in res["times"]) for k, v in results.items()}
    for kind, runs in results.items():
        table.add(model=kind, **{"params M": runs[0]["params M"], "ms/step": ms[kind],
                                 "tokens/s": tokens * 1e3 / ms[kind], "peak GiB": max(r["peak GiB"] for r in runs),
                                 "loss first": runs[0]["loss first"], "loss last": runs[0]["loss last"],
                                 "ours speedup": f"{ms[kind] / ms['ours']:.2f}x"})
    text = (f"{run_tag()}\nMamba-2 LM d_model {args.d_model} x {args.layers} layers, length {args.length}, batch "
            f"{args.batch}, bf16 autocast, no checkpointing; median of {args.rounds} x {args.steps} steps\n\n"
            + table.markdown())
    report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
