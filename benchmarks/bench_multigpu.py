"""Multi-GPU training (DDP, FSDP) of the DNA recipes and multi-GPU zarr inference.

    python benchmarks/bench_multigpu.py train --strategy ddp --devices 1    # 1-GPU baseline (no strategy)
    python benchmarks/bench_multigpu.py train --strategy ddp --devices 2    # recipes/dna_ddp.yaml
    python benchmarks/bench_multigpu.py train --strategy fsdp --devices 2   # recipes/dna_fsdp.yaml
    python benchmarks/bench_multigpu.py restore --runs ddp2,fsdp2           # checkpoints on 1 GPU
    python benchmarks/bench_multigpu.py report                              # table, curves, PNG
    python benchmarks/bench_multigpu.py infer --devices 1,2                 # streamssm infer N GPUs

``train`` runs the recipe through LightningCLI (the same parser and classes as
``streamssm fit --config recipes/dna_<strategy>.yaml``) on a generated genome
(``streamssm.datamodules.synthetic.write_fasta``, 4 chromosomes, chr4 held out), with these
overrides: ``--trainer.devices``, ``--steps + --warmup`` optimizer steps, no validation, logger
or checkpoint callback, warmup of the learning rate over 5 steps (cosine to the last step) and
no gradient clipping (Lightning's FSDP precision plugin cannot clip by norm, so no run clips
and the three loss curves come from the same optimization). ``--devices 1`` replaces the
strategy by Lightning's single-device one: the baseline. A callback times every optimizer
step (CUDA-synchronized ends of consecutive steps, data loading included), records the loss
averaged over ranks and, after the warm-up steps (compilation, autotuning), the peak memory
of every rank. At the end it computes the loss of a fixed validation batch with the trained
(still wrapped) model in fp32 and saves a full checkpoint; ``restore`` loads that checkpoint
with ``streamssm.checkpoint.load_for_serving`` on one device and checks the loss of the same
batch. Tokens/s per GPU = tokens per step per GPU x timed steps / their wall time; scaling
efficiency = tokens/s of all GPUs / (GPUs x tokens/s of the 1-GPU run).

``infer`` writes a ``series x steps x channels`` float32 zarr store (``bench_zarr.write_store``),
exports a random Mamba-2 regression model, runs ``streamssm infer --devices N`` for each N
(after one untimed run that compiles the kernels; ``TRITON_CACHE_AUTOTUNING=1`` keeps the
autotuning out of the timed runs) and checks that every output holds the same bytes.

``--smoke`` shrinks everything (tiny model, 256-step windows, CPU, fp32) to check the
plumbing (DDP over gloo) on a machine without a GPU. Results go to ``--workdir`` (JSON per
run, checkpoints, ``loss_curves.png``). Keep NVLink multicast off where the machine requires
it (``NCCL_NVLS_ENABLE=0``); the command inherits the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streamssm.checkpoint import load_for_serving  # noqa: E402
from streamssm.tasks import SSMTask, TokenLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"ddp": ROOT / "recipes" / "dna_ddp.yaml", "fsdp": ROOT / "recipes" / "dna_fsdp.yaml"}
EVAL_WINDOWS = 2
#: relative tolerance of the restored loss: fp32 runs compare fp32 with fp32; FSDP's bf16-mixed
#: computes with bf16 parameters (FSDP MixedPrecision), the restored model in fp32.
RESTORE_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _rank() -> int:
    """This process's global rank as a launcher announces it (0 before any launch)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def run_name(strategy: str, devices: int, keep_strategy: bool = False) -> str:
    return "1gpu" if devices == 1 and not keep_strategy else f"{strategy}{devices}"


# ----------------------------------------------------------------------------------- data


def ensure_genome(path: Path, length: int) -> Path:
    """Write the generated genome (4 chromosomes) and its .fai once, before any rank starts
    (the ranks of a DDP run would otherwise race to build the index)."""
    if not path.exists() and _rank() == 0:
        from streamssm.datamodules import synthetic
        from streamssm.datamodules.fasta import open_fasta

        tmp = path.with_suffix(".tmp.fa")
        synthetic.write_fasta(tmp, n_chrom=4, length=length, seed=0)
        os.replace(tmp, path)
        open_fasta(path).close()  # builds path.fai
    return path


def lm_loss(task: SSMTask, forward, batch: dict[str, torch.Tensor]) -> float:
    """Loss (nats/token) of ``forward(inputs)`` on ``batch`` with the task's metric."""
    with torch.no_grad():
        outputs = forward(batch["inputs"])
        return float(task._metrics(outputs, batch["targets"], batch.get("mask"))["loss"])


# ---------------------------------------------------------------------------------- train


class StepProbe(pl.Callback):
    """Times every step, keeps the rank-mean loss and peak memory; at the end scores a fixed
    validation batch with the trained model and saves a full checkpoint (all ranks take part:
    FSDP gathers parameters for both)."""

    def __init__(self, warmup: int, out: Path) -> None:
        self.warmup, self.out = warmup, out
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.tokens_per_step = 0
        self.info: dict[str, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        groups = trainer.optimizers[0].param_groups
        numel = torch.tensor([sum(p.numel() for p in g["params"]) for g in groups], device=pl_module.device)
        # per rank: parameters in the weight-decay group and in the other (local shards under FSDP)
        per_rank = trainer.strategy.all_gather(numel).reshape(-1, len(groups))
        self.info["optimizer_group_numel"] = per_rank.tolist()
        _sync()
        self.t_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup and _cuda():
            torch.cuda.reset_peak_memory_stats()
        self.tokens_per_step = int(batch["inputs"].numel())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        self.ends.append(time.perf_counter())
        loss = outputs["loss"].detach().float()
        if trainer.world_size > 1:
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        peak = torch.cuda.max_memory_allocated() / 2**30 if _cuda() else float("nan")
        peaks = strategy.all_gather(torch.tensor([peak], device=pl_module.device)).flatten().tolist()
        batch = next(iter(trainer.datamodule.val_dataloader()))
        batch = {k: v[:EVAL_WINDOWS].to(pl_module.device) for k, v in batch.items()}
        # the wrapped model (DDP / FSDP / plain) called outside the precision plugin: no autocast
        eval_loss = lm_loss(pl_module, strategy.model, batch)
        ckpt = self.out / "last.ckpt"
        trainer.save_checkpoint(ckpt)
        strategy.barrier("bench-checkpoint-saved")
        if trainer.is_global_zero:
            save_file({k: v.cpu().contiguous() for k, v in batch.items()}, str(self.out / "eval_batch.safetensors"))
            self.info.update(peak_gib_per_rank=peaks, eval_loss=eval_loss, checkpoint=str(ckpt),
                             eval_batch=str(self.out / "eval_batch.safetensors"))


def _count_params(cfg) -> int:
    from streamssm.models import SSMModel

    with torch.device("meta"):
        return sum(p.numel() for p in SSMModel(cfg).parameters())


def train(args: argparse.Namespace) -> int:
    from streamssm.commands.fit import StreamSSMCLI

    work = Path(args.workdir)
    name = run_name(args.strategy, args.devices, args.keep_strategy)
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    genome = ensure_genome(work / "genome.fa", args.genome_length)
    total = args.warmup + args.steps
    overrides = [
        "--config", str(RECIPES[args.strategy]),
        "--trainer.devices", str(args.devices),
        "--trainer.max_steps", str(total),
        "--trainer.limit_val_batches", "0",
        "--trainer.gradient_clip_val", "null",
        "--trainer.logger", "false",
        "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.init_args.warmup_steps", "5",
        "--model.init_args.max_steps", str(total),
        "--data.init_args.fasta", str(genome),
        "--data.init_args.val_chroms", "[chr4]",
        "--data.init_args.test_chroms", "null",
        "--data.init_args.samples_per_epoch", str(max(1024, 2 * total * args.batch * args.devices)),
        "--data.init_args.batch_size", str(args.batch),
        "--data.init_args.num_workers", str(args.num_workers),
    ]
    if args.devices == 1 and not args.keep_strategy:
        overrides += ["--trainer.strategy", "auto"]
    if args.smoke:
        overrides += [
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--trainer.strategy", "ddp" if args.devices > 1 or args.keep_strategy else "auto",
            "--model.init_args.arch.d_model", "32", "--model.init_args.arch.n_layers", "2",
            "--model.init_args.arch.d_state", "16", "--model.init_args.arch.headdim", "16",
            "--model.init_args.arch.chunk_size", "32",
            "--data.init_args.window", "256", "--data.init_args.eval_windows", "4", "--data.init_args.pin_memory", "false",
        ]
    if args.window:
        overrides += ["--data.init_args.window", str(args.window)]
    saved, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads `overrides`; DDP's launcher re-runs `saved`
    try:
        cli = StreamSSMCLI(
            model_class=SSMTask, datamodule_class=pl.LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, save_config_callback=None, auto_configure_optimizers=False,
            args=overrides, run=False,
        )
    finally:
        sys.argv = saved
    probe = StepProbe(args.warmup, out)
    trainer = cli.trainer
    trainer.callbacks.append(probe)
    t0 = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    if not trainer.is_global_zero:
        return 0
    wall = time.perf_counter() - t0
    ends, steps_timed = probe.ends, len(probe.ends) - args.warmup
    if steps_timed < 2:
        print(f"{name}: only {len(ends)} steps ran; need more than --warmup {args.warmup}", file=sys.stderr)
        return 1
    intervals = np.diff(ends)[args.warmup - 1 :]
    seconds = ends[-1] - ends[args.warmup - 1]
    per_gpu = probe.tokens_per_step * steps_timed / seconds
    cfg = cli.model.model.cfg
    result = {
        "run": name, "strategy": "single device" if name == "1gpu" else args.strategy, "devices": args.devices,
        "gpu": torch.cuda.get_device_name() if _cuda() else "cpu", "recipe": str(RECIPES[args.strategy].relative_to(ROOT)),
        "model": f"{cfg.block} {cfg.n_layers}x{cfg.d_model} d_state {cfg.resolved_d_state}",
        "params_M": _count_params(cfg) / 1e6,
        "precision": str(trainer.precision), "batch_per_gpu": args.batch, "window": probe.tokens_per_step // args.batch,
        "tokens_per_step_per_gpu": probe.tokens_per_step, "warmup": args.warmup, "steps_timed": steps_timed,
        "ms_per_step_median": 1e3 * float(np.median(intervals)), "ms_per_step_mean": 1e3 * seconds / steps_timed,
        "tokens_s_per_gpu": per_gpu, "tokens_s_total": per_gpu * args.devices, "losses": probe.losses,
        "wall_s": wall, **probe.info,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: {result['ms_per_step_median']:.1f} ms/step (median of {steps_timed}), "
          f"{per_gpu:,.0f} tokens/s per GPU, {per_gpu * args.devices:,.0f} tokens/s total, peak GiB per rank "
          f"{[round(p, 2) for p in result['peak_gib_per_rank']]}, loss {probe.losses[0]:.4f} -> {probe.losses[-1]:.4f}, "
          f"optimizer groups (decay, no decay) numel per rank {result['optimizer_group_numel']}", flush=True)
    print(f"{name} loss curve: " + " ".join(f"{v:.4f}" for v in probe.losses), flush=True)
    return 0


# -------------------------------------------------------------------------------- restore


def restore(args: argparse.Namespace) -> int:
    """Load each run's checkpoint on one device and compare the loss of its saved batch."""
    from _harness import Table

    device = "cuda" if _cuda() else "cpu"
    table = Table(["run", "checkpoint", "loss (trained, wrapped)", "loss (restored, 1 device)", "abs diff",
                   "rel diff", "rtol", "match"])
    ok = True
    for name in args.runs.split(","):
        res = json.loads((Path(args.workdir) / name / "result.json").read_text())
        bundle = load_for_serving(res["checkpoint"], device)
        batch = {k: v.to(device) for k, v in load_file(res["eval_batch"]).items()}
        task = TokenLM()
        task.model = bundle.model
        loss = lm_loss(task, lambda x: bundle.model(x)[0], batch)
        ref = res["eval_loss"]
        kind = "bf16" if res["strategy"] == "fsdp" and "bf16" in res["precision"] else "fp32"
        rel = abs(loss - ref) / abs(ref)
        match = rel <= RESTORE_RTOL[kind]
        ok &= match
        table.add(**{"run": name, "checkpoint": Path(res["checkpoint"]).name, "loss (trained, wrapped)": f"{ref:.6f}",
                     "loss (restored, 1 device)": f"{loss:.6f}", "abs diff": f"{abs(loss - ref):.2e}", "rel diff": f"{rel:.2e}",
                     "rtol": RESTORE_RTOL[kind], "match": "yes" if match else "NO"})
    print(f"checkpoints restored with load_for_serving on 1 {device} device; loss of the same "
          f"{EVAL_WINDOWS} validation windows in fp32")
    print(table.markdown(), flush=True)
    return 0 if ok else 1


# --------------------------------------------------------------------------------- report


def report(args: argparse.Namespace) -> int:
    """Scaling table, loss curves (printed and ``loss_curves.png``) of the runs found."""
    from _harness import Table, run_tag

    work = Path(args.workdir)
    names = ("1gpu", "ddp1", "fsdp1", "ddp2", "fsdp2", "ddp4", "fsdp4", "ddp8", "fsdp8")
    results = [json.loads(p.read_text()) for name in names
               if (p := work / name / "result.json").exists()]
    if not results:
        print(f"no result.json under {work}", file=sys.stderr)
        return 1
    base = next((r for r in results if r["run"] == "1gpu"), None)
    table = Table(["run", "GPUs", "strategy", "batch/GPU x window", "ms/step median", "ms/step mean",
                   "tokens/s per GPU", "tokens/s total", "scaling eff.", "peak GiB (max rank)", "loss first",
                   "loss last"])
    for r in results:
        eff = (r["tokens_s_total"] / (r["devices"] * base["tokens_s_per_gpu"])) if base else float("nan")
        table.add(**{"run": r["run"], "GPUs": r["devices"], "strategy": r["strategy"],
                     "batch/GPU x window": f"{r['batch_per_gpu']} x {r['window']}",
                     "ms/step median": r["ms_per_step_median"], "ms/step mean": r["ms_per_step_mean"],
                     "tokens/s per GPU": f"{r['tokens_s_per_gpu']:,.0f}", "tokens/s total": f"{r['tokens_s_total']:,.0f}",
                     "scaling eff.": f"{eff:.3f}", "peak GiB (max rank)": max(r["peak_gib_per_rank"]),
                     "loss first": r["losses"][0], "loss last": r["losses"][-1]})
    r0 = results[0]
    print(f"{r0['model']} ({r0['params_M']:.1f} M params), {r0['precision']}, {r0['recipe'].replace('_ddp', '_<strategy>')}, "
          f"timed {r0['steps_timed']} steps after {r0['warmup']} · {run_tag()}")
    print("scaling eff. = tokens/s total / (GPUs x tokens/s of the 1-GPU run)")
    print(table.markdown())
    n = max(len(r["losses"]) for r in results)
    curves = Table(["step", *(r["run"] for r in results)])
    for i in range(n):
        curves.add(step=i + 1, **{r["run"]: f"{r['losses'][i]:.4f}" if i < len(r["losses"]) else None for r in results})
    print("\ntraining loss per step (mean over ranks; global batch = GPUs x batch/GPU windows)")
    print(curves.markdown(), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['run']} ({r['strategy']}, {r['devices']} GPU)")
    ax.axhline(math.log(5), color="grey", lw=0.8, ls=":", label="log 5 (uniform)")
    ax.set(xlabel="optimizer step", ylabel="train loss (nats/base)", title=f"{r0['model']}, window {r0['window']}")
    ax.legend()
    fig.tight_layout()
    png = Path(args.png) if args.png else work / "loss_curves.png"
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")
    return 0


# ---------------------------------------------------------------------------------- infer


_STEPS_RE = re.compile(r"(\d+) series steps in ([\d.]+) s")


def _infer_cmd(ckpt: Path, store: Path, out: Path, devices: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "streamssm", "infer", "--checkpoint", str(ckpt), "--input", str(store),
            "--output", str(out), "--devices", str(devices), "--batch-series", str(args.batch_series),
            "--accelerator", "gpu" if _cuda() else "cpu", "--overwrite", "--no-progress"]


def _run_infer(cmd: list[str], env: dict[str, str]) -> tuple[float, int, float, str]:
    """(wall s, series steps over ranks, slowest rank's predict s, stderr) of one CLI run."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    found = [(int(a), float(b)) for a, b in _STEPS_RE.findall(proc.stderr)]
    return wall, sum(s for s, _ in found), max((t for _, t in found), default=float("nan")), proc.stderr


def _same_safetensors(a: Path, b: Path) -> bool:
    """Same tensors and metadata (safetensors writes metadata keys in a per-process hash order)."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def compare_outputs(a: Path, b: Path) -> tuple[bool, bool, str]:
    """(decoded arrays equal, every file equal, detail) of two ``streamssm infer`` outputs.

    Files are equal when their bytes are; resume records (safetensors) when their content is.
    """
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(k for k, _ in ga.arrays())
    arrays_equal, detail = names == sorted(k for k, _ in gb.arrays()), []
    for name in names:
        xa, xb = ga[name][...], gb[name][...]
        same = xa.shape == xb.shape and xa.tobytes() == xb.tobytes()
        arrays_equal &= same
        if not same:
            detail.append(f"{name}: max |diff| {float(np.nanmax(np.abs(xa - xb))):.3g}")
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    byte_diff = [p for p in sorted(files_a & files_b) if (a / p).read_bytes() != (b / p).read_bytes()]
    differ = [str(p) for p in byte_diff if p.suffix != ".safetensors" or not _same_safetensors(a / p, b / p)]
    files_equal = files_a == files_b and not differ
    if files_a != files_b:
        detail.append(f"file sets differ: {sorted(map(str, files_a ^ files_b))[:5]}")
    if differ:
        detail.append(f"{len(differ)} file(s) differ, e.g. {differ[:3]}")
    n_bytes = len(files_a) - len(byte_diff)
    summary = (f"{len(files_a)} files: {n_bytes} byte-identical, {len(byte_diff) - len(differ)} resume records "
               f"equal in content")
    return arrays_equal, files_equal, "; ".join(detail) or summary


def infer(args: argparse.Namespace) -> int:
    from _harness import Table, run_tag
    from bench_zarr import write_store

    from streamssm.checkpoint import export_safetensors
    from streamssm.models import ModelConfig, SSMModel

    work = Path(args.workdir) / "infer"
    work.mkdir(parents=True, exist_ok=True)
    devices = [int(d) for d in args.devices_list.split(",")]
    chunk = 65536 if not args.smoke else 1024
    series, steps = (args.series, args.steps) if not args.smoke else (2 * args.batch_series, 4096)  # a unit per rank
    mb = write_store(work / "in.zarr", series, steps, args.channels, min(chunk, steps))
    write_store(work / "warm.zarr", args.batch_series, min(chunk, steps), args.channels, min(chunk, steps), seed=1)
    torch.manual_seed(0)
    d_model, layers = (args.d_model, args.layers) if not args.smoke else (32, 2)
    cfg = ModelConfig(block="mamba2", d_model=d_model, n_layers=layers, d_state=128 if not args.smoke else 16,
                      headdim=64 if not args.smoke else 16, chunk_size=256 if not args.smoke else 32,
                      input_kind="continuous", input_dim=args.channels, head="regression", output_dim=args.channels)
    ckpt = export_safetensors(SSMModel(cfg), work / "sensor.safetensors")
    env = {**os.environ, "TRITON_CACHE_AUTOTUNING": "1", "PYTHONUNBUFFERED": "1"}
    _run_infer(_infer_cmd(ckpt, work / "warm.zarr", work / "warm_out.zarr", 1, args), env)  # compile + autotune
    table = Table(["devices", "series x steps x ch", "wall s (CLI)", "predict s (slowest rank)", "steps/s (predict)",
                   "steps/s (wall)", "speedup (predict)", "speedup (wall)", "output == 1 device"])
    rows = []
    for n in devices:
        wall, done, pred, _ = _run_infer(_infer_cmd(ckpt, work / "in.zarr", work / f"out{n}.zarr", n, args), env)
        rows.append((str(n), f"out{n}.zarr", wall, done, pred))
    if args.fresh_autotune:  # every process autotunes anew: may another kernel config change the bytes?
        n = args.fresh_autotune
        fresh = {k: v for k, v in env.items() if k != "TRITON_CACHE_AUTOTUNING"}
        wall, done, pred, _ = _run_infer(_infer_cmd(ckpt, work / "in.zarr", work / f"fresh{n}.zarr", n, args), fresh)
        rows.append((f"{n} (autotuned per process, timing incl. tuning)", f"fresh{n}.zarr", wall, done, pred))
    base_wall, base_pred = rows[0][2], rows[0][4]
    total_steps = series * steps
    all_same = True
    for i, (n, out, wall, done, pred) in enumerate(rows):
        if done != total_steps:
            print(f"devices {n}: the ranks report {done} series steps, expected {total_steps}", file=sys.stderr)
            all_same = False
        if i == 0:
            same = "reference"
        else:
            arrays_eq, files_eq, detail = compare_outputs(work / rows[0][1], work / out)
            same = f"arrays {'identical' if arrays_eq else 'DIFFER'}, files {'identical' if files_eq else 'differ'} ({detail})"
            all_same &= arrays_eq
        table.add(**{"devices": n, "series x steps x ch": f"{series} x {steps} x {args.channels}", "wall s (CLI)": wall,
                     "predict s (slowest rank)": pred, "steps/s (predict)": f"{total_steps / pred:,.0f}",
                     "steps/s (wall)": f"{total_steps / wall:,.0f}", "speedup (predict)": f"{base_pred / pred:.2f}x",
                     "speedup (wall)": f"{base_wall / wall:.2f}x", "output == 1 device": same})
    print(f"streamssm infer: mamba2 {layers}x{d_model} regression model (fp32, random weights), {mb:.0f} MB float32 "
          f"input, chunk_steps {chunk}, batch_series {args.batch_series} · {run_tag()}")
    print("predict s: the slowest rank's own timing (streamssm infer log); wall: the whole command incl. start-up")
    print(table.markdown(), flush=True)
    return 0 if all_same else 1


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "restore", "report", "infer"])
    p.add_argument("--workdir", default="/tmp/bench_multigpu")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo): checks the plumbing")
    p.add_argument("--strategy", choices=sorted(RECIPES), default="ddp", help="train: which recipe")
    p.add_argument("--devices", type=int, default=2, help="train: GPUs (1 = single-device baseline)")
    p.add_argument("--keep-strategy", action="store_true",
                   help="train: keep the recipe's DDP/FSDP strategy with --devices 1 (a 1-process group)")
    p.add_argument("--steps", type=int, default=40, help="train: timed optimizer steps")
    p.add_argument("--warmup", type=int, default=10, help="train: untimed first steps (compile, autotune)")
    p.add_argument("--batch", type=int, default=8, help="train: windows per GPU per step")
    p.add_argument("--window", type=int, default=None, help="train: override the recipe's window (8192)")
    p.add_argument("--num-workers", type=int, default=4, help="train: DataLoader workers per GPU")
    p.add_argument("--genome-length", type=int, default=1_000_000, help="train: bases per generated chromosome")
    p.add_argument("--runs", default="ddp2,fsdp2", help="restore: runs whose checkpoints to load")
    p.add_argument("--png", default=None, help="report: where to save the loss curves")
    p.add_argument("--devices-list", default="1,2", help="infer: device counts, the first is the reference")
    p.add_argument("--fresh-autotune", type=int, default=0,
                   help="infer: one more run on this many devices, each process autotuning anew (0: none)")
    p.add_argument("--series", type=int, default=16, help="infer: series in the store")
    p.add_argument("--steps-per-series", dest="steps_infer", type=int, default=262_144, help="infer: time steps")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch-series", type=int, default=4, help="infer: series per model call")
    p.add_argument("--d-model", type=int, default=768, help="infer: model width")
    p.add_argument("--layers", type=int, default=12, help="infer: model depth")
    args = p.parse_args(argv)
    if args.mode == "infer":
        args.steps = args.steps_infer
    if args.smoke and args.genome_length == 1_000_000:
        args.genome_length = 20_000
    if args.mode == "train" and not args.smoke and not _cuda():
        print("bench_multigpu train needs CUDA GPUs (or --smoke on CPU)", file=sys.stderr)
        return 2
    return {"train": train, "restore": restore, "report": report, "infer": infer}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
