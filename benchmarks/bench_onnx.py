"""CPU stream-steps/s of the recurrent step exported to ONNX (onnxruntime) vs our PyTorch step.

    python benchmarks/bench_onnx.py [--blocks mamba,mamba2] [--batches 1,64] [--d-model 128]
                                    [--layers 4] [--threads 2] [--steps 200] [--repeats 3] [--no-compile]

One model per block type (tokens in, vocabulary 256, LM head; fp32; random weights), the same
inputs for every provider, ``--steps`` steps of ``batch`` streams carrying the state:
    onnxruntime  ``step.onnx`` from :func:`streamssm.onnx_export.export_program` + ``to_onnx``
                 (batch axis dynamic), CPUExecutionProvider, ``intra_op_num_threads=--threads``;
                 numpy state arrays passed in and taken back each step
    eager step   ``SSMModel.step`` (a new state per call, what the graph computes) under
                 ``torch.inference_mode``, ``torch.set_num_threads(--threads)``
    eager pool   ``SSMModel.step_pool`` (the service's in-place state-pool step)
    compiled     ``torch.compile`` (inductor C++, static shapes) of the same flat step graph;
                 "compile s" is its first call
stream-steps/s = batch * steps / time; the median of ``--repeats`` runs after one warm-up run,
providers interleaved per repeat (the machine's load drifts); ratio = provider steps/s / eager step.
Before timing, every provider's last outputs are checked against the eager step's (1e-4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, run_tag

from streamssm.models import ModelConfig, SSMModel
from streamssm.onnx_export import (
    StepGraph,
    export_program,
    flatten_state,
    graph_shapes,
    manifest,
    to_onnx,
    unflatten_state,
)

Runner = Callable[[torch.Tensor], torch.Tensor]  # runs all steps of (steps, batch) inputs -> last outputs


def _onnx_runner(model: SSMModel, folder: Path, threads: int) -> Runner:
    shapes = graph_shapes(1, 1)
    meta = manifest(model, shapes)
    onnx.save(to_onnx(export_program(model, shapes["step"]), meta["graphs"]["step"], meta), folder / "step.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(folder / "step.onnx"), options, providers=["CPUExecutionProvider"])
    names = [s["name"] for s in meta["state"]]

    def run(xs: torch.Tensor) -> torch.Tensor:
        state = {n: t.numpy() for n, t in zip(names, flatten_state(model.init_state(xs.shape[1])))}
        for x in xs.numpy():
            y, *new = sess.run(None, {"x": x, **state})
            state = dict(zip(names, new))
        return torch.from_numpy(y)

    return run


def _step_runner(step: Callable, model: SSMModel) -> Runner:
    """Runs ``step(x, *flat_state) -> (y, *flat_state)``."""

    def run(xs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            state = flatten_state(model.init_state(xs.shape[1]))
            for x in xs:
                y, *state = step(x, *state)
        return y

    return run


def _pool_runner(model: SSMModel) -> Runner:
    def run(xs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            pool = model.init_state(xs.shape[1])
            rows = torch.arange(xs.shape[1])
            for x in xs:
                y = model.step_pool(x, pool, rows)
        return y

    return run


def _eager_step(model: SSMModel) -> Callable:
    def step(x, *flat):
        y, new = model.step(x, unflatten_state(flat))
        return (y, *flatten_state(new))

    return step


def bench_block(block: str, args: argparse.Namespace, table: Table, folder: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(block=block, d_model=args.d_model, n_layers=args.layers, vocab_size=256)
    model = SSMModel(cfg).eval()
    runners: dict[str, Runner] = {
        "eager step": _step_runner(_eager_step(model), model),
        "eager pool": _pool_runner(model),
        "onnxruntime": _onnx_runner(model, folder, args.threads),
    }
    compile_s = None
    if args.compile:
        compiled = torch.compile(StepGraph(model), dynamic=False)
        runners["compiled"] = _step_runner(compiled, model)
    for batch in args.batches:
        xs = torch.randint(0, 256, (args.steps, batch))
        ref = runners["eager step"](xs)
        for name, run in runners.items():
            start = time.perf_counter()
            last = run(xs)  # warm-up (the compiled row compiles for this batch here)
            if name == "compiled":
                compile_s = time.perf_counter() - start
            err = float((last - ref).abs().max())
            if err > 1e-4:
                raise AssertionError(f"{block} batch {batch}: {name} differs from the eager step by {err:.3g}")
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run(xs)
                times[name].append(time.perf_counter() - start)
        base = batch * args.steps / statistics.median(times["eager step"])
        for name, ts in times.items():
            rate = batch * args.steps / statistics.median(ts)
            table.add(block=block, streams=batch, provider=name, **{"ms/step": 1e3 * statistics.median(ts) / args.steps,
                      "stream-steps/s": rate, "vs eager step": f"{rate / base:.2f}x",
                      "compile s": compile_s if name == "compiled" else None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="mamba,mamba2")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    table = Table(["block", "streams", "provider", "ms/step", "stream-steps/s", "vs eager step", "compile s"])
    with tempfile.TemporaryDirectory() as tmp:
        for block in args.blocks.split(","):
            bench_block(block, args, table, Path(tmp))
    print(f"CPU step: d_model {args.d_model}, {args.layers} layers, {args.threads} threads, {args.steps} steps · "
          f"onnxruntime {ort.__version__} · {run_tag()}")
    print(table.markdown())


if __name__ == "__main__":
    main()
