"""Training throughput and memory of the TokenLM task through a Lightning Trainer (GPU).

    python benchmarks/bench_train.py [--configs mamba2:8192:8,mamba2:131072:1,mamba2:1048576:1]
                                     [--d-model 512] [--layers 4] [--steps 10] [--budget-s 170]

Each config ``block:length:batch`` trains a fresh ``streamssm.tasks.TokenLM`` (vocab 5, the
DNA alphabet) with ``precision="bf16-mixed"``, AdamW + warmup/cosine and per-layer gradient
checkpointing (``checkpoint_layers``), exactly as ``streamssm fit`` would, on learnable
synthetic tokens (a random 37-token motif repeated with 10 % substitutions, so the loss must
fall below log(5) = 1.609 nats). After ``--warmup`` steps (Triton compilation, autotuning)
it times ``--steps`` optimizer steps with CUDA-synchronized wall clocks around each step and
reports ms/step, steps/s, tokens/s, the peak memory allocated during training (weights,
optimizer state and activations included) and the loss at the first and last step.
Every step is printed to stderr as it ends (flushed), so a run cut short still tells; past
``--budget-s`` seconds the running config stops after its current step and the rest are
skipped (and say so). Through a pipe use ``grep --line-buffered``/``tee`` so nothing is held back.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, report, run_tag  # noqa: E402

from streamssm.plots import plot_training_curve  # noqa: E402
from streamssm.models import ArchConfig  # noqa: E402
from streamssm.tasks import TokenLM  # noqa: E402

VOCAB = 5


class MotifTokens(Dataset):
    """Windows of ``length + 1`` tokens: a fixed random motif repeated, 10 % substituted."""

    def __init__(self, length: int, items: int, period: int = 37, noise: float = 0.1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.motif = torch.randint(0, 4, (period,), generator=g)
        self.length, self.items, self.noise, self.seed = length, items, noise, seed

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + i + 1)
        n = self.length + 1
        offset = int(torch.randint(0, len(self.motif), (1,), generator=g))
        reps = (n + offset) // len(self.motif) + 1
        seq = self.motif.repeat(reps)[offset : offset + n].clone()
        flip = torch.rand(n, generator=g) < self.noise
        seq[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
        return {"inputs": seq[:-1], "targets": seq[1:]}


class StepTimer(pl.Callback):
    """Synchronized wall time and loss of every training step; peak memory after warm-up."""

    def __init__(self, warmup: int, deadline: float, label: str) -> None:
        self.warmup, self.deadline, self.label = warmup, deadline, label
        self.times: list[float] = []
        self.losses: list[float] = []
        self._t0 = 0.0
        self.peak_gib = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        if batch_idx == self.warmup:
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)
        self.losses.append(float(outputs["loss"]))
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        print(f"  {self.label} step {batch_idx}: {1e3 * self.times[-1]:.1f} ms, loss {self.losses[-1]:.4f}, "
              f"peak {self.peak_gib:.2f} GiB", file=sys.stderr, flush=True)
        if time.perf_counter() > self.deadline:  # out of time: stop after this step, report what ran
            trainer.should_stop = True


def run_config(block: str, length: int, batch: int, args: argparse.Namespace,
               deadline: float) -> tuple[dict, list[float]]:
    """One config's table row and its loss at every step."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pl.seed_everything(0, verbose=False)
    total = args.warmup + args.steps
    arch = ArchConfig(block=block, d_model=args.d_model, n_layers=args.layers,
                      d_state=args.d_state if block == "mamba2" else 16, headdim=64, chunk_size=256,
                      checkpoint_layers=not args.no_checkpoint)
    task = TokenLM(arch, input_kind="tokens", vocab_size=VOCAB, lr=args.lr, warmup_steps=2, max_steps=total,
                   weight_decay=0.1)
    timer = StepTimer(args.warmup, deadline, f"{block}:{length}:{batch}")
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=total, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer],
    )
    data = DataLoader(MotifTokens(length, total * batch), batch_size=batch, num_workers=0)  # no fork after CUDA init
    t_start = time.perf_counter()
    trainer.fit(task, data)
    wall = time.perf_counter() - t_start
    timed = timer.times[args.warmup :] or timer.times[-1:]  # stopped early: the last step
    ms = 1e3 * sorted(timed)[len(timed) // 2]  # median
    return {
        "block": block, "length": length, "batch": batch,
        "params M": sum(p.numel() for p in task.model.parameters()) / 1e6,
        "ms/step": ms, "steps/s": 1e3 / ms, "tokens/s": batch * length * 1e3 / ms,
        "peak GiB": timer.peak_gib, "loss first": timer.losses[0], "loss last": timer.losses[-1],
        "timed steps": len(timer.times[args.warmup :]), "wall s": wall,
    }, timer.losses


def plot_losses(curves: dict[str, list[float]], png: Path, title: str) -> Path:
    """Write the per-step losses as a metrics CSV (column '<config> loss') and plot it."""
    steps = max(len(v) for v in curves.values())
    csv_path = png.with_suffix(".csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w") as f:
        f.write(",".join(["step"] + [f"{spec} loss" for spec in curves]) + "\n")
        for i in range(steps):
            f.write(",".join([str(i)] + [f"{v[i]:.6f}" if i < len(v) else "" for v in curves.values()]) + "\n")
    return plot_training_curve(csv_path, png, title)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="mamba2:8192:8,mamba2:131072:1,mamba2:1048576:1,mamba:1048576:1",
                        help="comma-separated block:length:batch")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-state", type=int, default=64, help="Mamba-2 d_state (Mamba-1 uses 16)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compile, autotune)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--no-checkpoint", action="store_true", help="disable per-layer gradient checkpointing")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="stop the running config after the step that crosses this; skip the rest")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--plot", default=None, help="PNG of every config's loss per step (CSV beside it)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_train needs a CUDA GPU", file=sys.stderr)
        return 2
    cols = ["block", "length", "batch", "params M", "ms/step", "steps/s", "tokens/s", "peak GiB",
            "loss first", "loss last", "timed steps", "wall s"]
    table = Table(cols)
    curves: dict[str, list[float]] = {}
    start = time.perf_counter()
    for spec in args.configs.split(","):
        block, length, batch = spec.split(":")
        if time.perf_counter() - start > args.budget_s:
            print(f"skipped {spec}: past the {args.budget_s:.0f} s budget", flush=True)
            continue
        try:
            row, curves[spec] = run_config(block, int(length), int(batch), args, start + args.budget_s)
        except torch.OutOfMemoryError as exc:
            print(f"{spec}: out of memory: {str(exc).splitlines()[0]}", flush=True)
            continue
        table.add(**row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    tag = run_tag()
    text = (f"{tag}\nTokenLM d_model {args.d_model} x {args.layers} layers, bf16-mixed, "
            f"checkpoint_layers={not args.no_checkpoint}, median of {args.steps} steps after {args.warmup}\n\n"
            + table.markdown())
    report(text, args.out)
    if args.plot and curves:
        plot_losses(curves, Path(args.plot), f"TokenLM d_model {args.d_model} x {args.layers}, bf16-mixed")
    if any(math.isnan(r["loss last"]) or r["loss last"] >= r["loss first"] for r in table.rows):
        print("WARNING: loss did not go down in some config", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
