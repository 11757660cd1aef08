"""Drive one stream through a model exported with ``streamssm export --format onnx``, using
numpy and onnxruntime only (no torch, no streamssm at run time).

    streamssm export --checkpoint model.safetensors --format onnx --output model-onnx/
    python docs/examples/onnx_stream.py model-onnx/ inputs.npy --output outputs.npy

``inputs.npy``: the model inputs of one stream, already encoded as the model takes them
(``streamssm.json``'s ``serving`` section says how): token ids (l,) or values (l, c).
Whole chunks go through ``chunk.onnx`` (when it was exported for one stream), the rest
through ``step.onnx`` one time step at a time, carrying the recurrent state between calls.
Writes the outputs (l, o) and prints the throughput.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def zero_state(manifest: dict, batch: int) -> dict[str, np.ndarray]:
    """A new stream's state: zeros of every listed shape and dtype ("batch" -> ``batch``)."""
    return {s["name"]: np.zeros([batch if d == "batch" else d for d in s["shape"]], s["dtype"])
            for s in manifest["state"]}


class OnnxStream:
    """One stream: feed it inputs, it carries the state between the graph calls."""

    def __init__(self, folder: Path, threads: int = 1):
        self.manifest = json.loads((folder / "streamssm.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {kind: ort.InferenceSession(str(folder / graph["file"]), options,
                                                    providers=["CPUExecutionProvider"])
                         for kind, graph in self.manifest["graphs"].items()}
        self.state = zero_state(self.manifest, 1)
        chunk = self.manifest["graphs"]["chunk"]
        self.chunk_length = chunk["length"] if chunk["batch"] == 1 else 0  # a chunk graph of one stream

    def _run(self, kind: str, x: np.ndarray) -> np.ndarray:
        outputs = self.sessions[kind].run(None, {"x": x, **self.state})
        self.state = {s["name"]: new for s, new in zip(self.manifest["state"], outputs[1:])}
        return outputs[0][0]  # drop the batch axis

    def feed(self, inputs: np.ndarray) -> np.ndarray:
        """inputs (l,) token ids or (l, c) values -> outputs (l, o)."""
        dtype = self.manifest["graphs"]["step"]["inputs"][0]["dtype"]
        inputs = np.asarray(inputs, dtype=dtype)
        outs, done, length = [], 0, self.chunk_length
        while length and done + length <= len(inputs):
            outs.append(self._run("chunk", inputs[None, done:done + length]))
            done += length
        for t in range(done, len(inputs)):
            outs.append(self._run("step", inputs[None, t])[None])
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder written by streamssm export --format onnx")
    parser.add_argument("inputs", type=Path, help=".npy of one stream's model inputs: (l,) token ids or (l, c) values")
    parser.add_argument("--output", type=Path, help="write the outputs (l, o) to this .npy")
    parser.add_argument("--step-only", action="store_true", help="feed every time step through step.onnx")
    args = parser.parse_args(argv)
    stream = OnnxStream(args.folder)
    if args.step_only:
        stream.chunk_length = 0
    inputs = np.load(args.inputs)
    start = time.perf_counter()
    outputs = stream.feed(inputs)
    seconds = time.perf_counter() - start
    if args.output:
        np.save(args.output, outputs)
    print(f"{len(inputs)} steps -> outputs {outputs.shape} in {seconds:.3f} s ({len(inputs) / seconds:.0f} steps/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
