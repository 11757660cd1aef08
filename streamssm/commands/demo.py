"""``streamssm demo``: train, serve, stream and batch-infer tiny models on built-in data, with a
summary table and plots. Parses the options and prints; the pipeline is :mod:`streamssm.demo`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamssm import demo as demo_pipeline
from streamssm.commands.parsing import ArgumentParser


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=demo_pipeline.__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=(*demo_pipeline.TASK_NAMES, "all"), default="all", help="which demo to run (default: all)")
    p.add_argument("--out", default=None, help="output folder (default: ./demo_out, or ./demo_out/quick with --quick, "
                   "so a smoke run leaves a full run's models in place)")
    p.add_argument("--quick", action="store_true", help="a few training steps and a short stream (CI)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator for training (auto|cpu|gpu)")
    return p


def output_folder(out: str | None, quick: bool) -> Path:
    """``--out``, else ./demo_out (./demo_out/quick for a ``--quick`` run), absolute."""
    return Path(out or ("demo_out/quick" if quick else "demo_out")).resolve()


def main(argv: list[str], prog: str = "streamssm demo") -> int:
    args = build_parser(prog).parse_args(argv)
    import lightning.pytorch  # noqa: F401  (configures its loggers on import; quieted below)

    for noisy in ("websockets", "lightning", "lightning.pytorch", "streamssm.service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    size = demo_pipeline.QUICK if args.quick else demo_pipeline.FULL
    names = demo_pipeline.TASK_NAMES if args.task == "all" else (args.task,)
    out_root = output_folder(args.out, args.quick)
    console = Console()
    rows = []
    started = time.perf_counter()

    def announcer(k: int, name: str) -> Callable[[str], None]:
        def on_stage(stage: str) -> None:
            console.print(f"task {k} of {len(names)} ({name}): {stage} · {time.perf_counter() - started:.0f} s elapsed",
                          highlight=False, soft_wrap=True)
        return on_stage

    with Progress(console=console, transient=True) as progress:
        for k, name in enumerate(names, 1):
            console.rule(f"demo: {name}")
            try:
                rows.append(demo_pipeline.run_task(name, out_root, size, args.accelerator, progress, announcer(k, name)))
            except demo_pipeline.DemoParityError as exc:
                console.print(f"[bold red]parity check failed[/]: {exc}")
                return 1
    table = Table(title="streamssm demo (held-out signal)")
    for col in ("task", "model", "no model", "stream diff", "zarr diff", "p50 ms", "s"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        table.add_row(r["task"], f"{r['model']:.4g}", f"{r['baseline']:.4g}", f"{r['stream_diff']:.1e}",
                      f"{r['zarr_diff']:.1e}", f"{r['p50_ms']:.1f}", f"{r['seconds']:.0f}")
    console.print(table)
    console.print(f"{len(rows)} task(s) in {time.perf_counter() - started:.0f} s", highlight=False)
    console.print("model / no model: the held-out metric of the trained model and of a no-model baseline; "
                  "stream diff / zarr diff: max |difference| of the websocket stream and of zarr inference "
                  "from one offline forward pass; p50 ms: median chunk round trip over the websocket.")
    for r in rows:
        console.print(f"{r['task']}: {r['metric']}; checkpoint {r['checkpoint']}")
        for png in r["plots"]:
            console.print(f"  plot {png}")
    return 0
