"""Export a model's recurrent step and a fixed-length chunk as graphs over flat tensors:
``torch.export`` programs (``.pt2``) and ONNX files that ONNX Runtime runs without torch.

Shape legend: b streams (a dynamic axis of the step graph), B streams of the chunk graph and
L its length (both fixed at export), c input channels, o outputs per step.

Two graphs, same calling convention (inputs, then the state; outputs, then the new state):

    step:  x_t (b,) int64 tokens | (b, c) float32 values, *state  ->  y (b, o), *new_state
    chunk: x (B, L) int64 | (B, L, c) float32,              *state  ->  y (B, L, o), *new_state

The chunk's batch is fixed because the chunked scans group their chunks into memory blocks
sized by the batch (a Python-level choice the trace cannot keep symbolic).

The state is the model's :data:`~streamssm.state.ModelState` flattened layer by layer,
``conv`` before ``ssm``: inputs ``state.<i>.conv``, ``state.<i>.ssm`` (i = 0..n_layers-1),
outputs ``new_state.<i>.conv``, ``new_state.<i>.ssm``. A new stream starts from zeros of the
listed shapes and dtypes. The layout, the ModelConfig, the ServingSpec and the chunk length
are written as JSON into each ONNX file's metadata (key ``streamssm``) and beside the files
(``streamssm.json``), so a client needs nothing else.

The graphs trace the models' CPU path: the pure-PyTorch math of the kernels (the single-step
references for ``step``; the chunked scans for ``chunk``, Mamba-1's on fixed pieces while
traced); no Triton kernel and no custom op is in them. Only float32 models on the CPU export.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from streamssm.checkpoint import ServingBundle, model_fingerprint, package_versions
from streamssm.errors import ConfigError
from streamssm.models import SSMModel
from streamssm.serving import ServingSpec
from streamssm.state import LayerState, ModelState

log = logging.getLogger(__name__)

GraphKind = Literal["step", "chunk"]
GRAPHS: tuple[GraphKind, ...] = ("step", "chunk")
#: layout version of the manifest (``streamssm.json`` / the ONNX metadata)
MANIFEST_VERSION = "1"
MANIFEST_FILE = "streamssm.json"
METADATA_KEY = "streamssm"
#: batch of the example inputs: 2, since torch.export specializes a dimension of size 1
_EXAMPLE_BATCH = 2


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` has ``"batch"`` for a dynamic axis."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GraphShape:
    """The fixed sizes of a graph: ``length`` None for the step; ``batch`` "batch" when dynamic."""

    kind: GraphKind
    batch: int | str = "batch"
    length: int | None = None


def graph_shapes(chunk_length: int, chunk_batch: int) -> dict[GraphKind, GraphShape]:
    """The step (dynamic batch) and the chunk (``chunk_batch`` streams of ``chunk_length`` steps)."""
    if chunk_length <= 0 or chunk_batch <= 0:
        raise ConfigError(f"chunk length and batch must be positive, got {chunk_length} and {chunk_batch}")
    return {"step": GraphShape("step"), "chunk": GraphShape("chunk", chunk_batch, chunk_length)}


def state_specs(model: SSMModel, shape: GraphShape, prefix: str = "state") -> list[TensorSpec]:
    """The state tensors in graph order: ``<prefix>.<layer>.conv``, ``<prefix>.<layer>.ssm``."""
    state = model.init_state(1, "meta")
    return [TensorSpec(f"{prefix}.{i}.{field}", (shape.batch, *t.shape[1:]), _dtype_name(t.dtype))
            for i, layer in enumerate(state) for field, t in zip(LayerState._fields, layer)]


def input_spec(model: SSMModel, shape: GraphShape) -> TensorSpec:
    """The ``x`` input of a graph (see the module docstring)."""
    cfg = model.cfg
    lead = (shape.batch,) if shape.length is None else (shape.batch, shape.length)
    if cfg.input_kind == "tokens":
        return TensorSpec("x", lead, "int64")
    return TensorSpec("x", (*lead, cfg.input_dim), "float32")


def output_spec(model: SSMModel, shape: GraphShape) -> TensorSpec:
    lead = (shape.batch,) if shape.length is None else (shape.batch, shape.length)
    return TensorSpec("y", (*lead, model.cfg.resolved_output_dim), "float32")


def unflatten_state(flat: Sequence[torch.Tensor]) -> ModelState:
    """Flat (conv, ssm, conv, ssm, ...) -> ModelState."""
    return tuple(LayerState(flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def flatten_state(state: ModelState) -> list[torch.Tensor]:
    """ModelState -> flat (layer 0 conv, layer 0 ssm, layer 1 conv, ...)."""
    return [t for layer in state for t in layer]


class StepGraph(nn.Module):
    """The recurrent step over flat tensors: ``(x_t, *state) -> (y, *new_state)``."""

    def __init__(self, model: SSMModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new = self.model.step(x, unflatten_state(state))
        return (y, *flatten_state(new))


class ChunkGraph(StepGraph):
    """The chunked forward carrying state: ``(x (b, L[, c]), *state) -> (y (b, L, o), *new_state)``."""

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new = self.model(x, unflatten_state(state))
        return (y, *flatten_state(new))


def _check_exportable(model: SSMModel) -> None:
    """CPU float32 models only: on CUDA the blocks would call the Triton ops, which ONNX lacks."""
    devices = sorted({p.device.type for p in model.parameters()} - {"cpu"})
    if devices:
        raise ConfigError(f"export traces the CPU path; this model is on {', '.join(devices)} (export model.cpu())")
    dtypes = sorted({_dtype_name(p.dtype) for p in model.parameters()} - {"float32"})
    if dtypes:
        raise ConfigError(f"export supports float32 models only; this one has {', '.join(dtypes)} parameters "
                          "(cast a copy with model.float())")


def example_inputs(model: SSMModel, shape: GraphShape) -> tuple[torch.Tensor, ...]:
    """Zeros x and the initial state for ``shape`` (a dynamic batch gets 2 streams)."""
    batch = _EXAMPLE_BATCH if shape.batch == "batch" else int(shape.batch)
    spec = input_spec(model, shape)
    device = next(model.parameters()).device
    x = torch.zeros((batch, *spec.shape[1:]), dtype=getattr(torch, spec.dtype), device=device)
    return (x, *flatten_state(model.init_state(batch, device)))


def export_program(model: SSMModel, shape: GraphShape) -> torch.export.ExportedProgram:
    """``torch.export`` the step or chunk graph of ``model`` with the sizes of ``shape``."""
    if shape.kind not in GRAPHS:
        raise ConfigError(f"graph must be one of {GRAPHS}, got {shape.kind!r}")
    _check_exportable(model)
    graph = (StepGraph if shape.kind == "step" else ChunkGraph)(model).eval()
    inputs = example_inputs(model, shape)
    dynamic = None
    if shape.batch == "batch":
        batch = torch.export.Dim("batch", min=1)
        dynamic = ({0: batch}, tuple({0: batch} for _ in inputs[1:]))
    with torch.enable_grad():  # the blocks' fp32 caches are bypassed while parameters record grads
        return torch.export.export(graph, inputs, dynamic_shapes=dynamic)


def manifest(model: SSMModel, shapes: dict[GraphKind, GraphShape], spec: ServingSpec | None = None,
             fingerprint: str = "", versions: dict[str, str] | None = None) -> dict[str, Any]:
    """What a client needs to drive the graphs: their inputs/outputs, the state layout (with the
    kind of each layer), the chunk length, the ModelConfig and the ServingSpec."""
    graphs = {}
    for kind, shape in shapes.items():
        graphs[kind] = {
            "file": f"{kind}.onnx",
            "batch": shape.batch,
            "length": shape.length,
            "inputs": [asdict(input_spec(model, shape)), *map(asdict, state_specs(model, shape))],
            "outputs": [asdict(output_spec(model, shape)), *map(asdict, state_specs(model, shape, "new_state"))],
        }
    return {
        "format": "streamssm-onnx",
        "format_version": MANIFEST_VERSION,
        "layer_kinds": list(model.cfg.layer_kinds),
        "state": [asdict(s) for s in state_specs(model, shapes["step"])],
        "graphs": graphs,
        "config": model.cfg.to_dict(),
        "serving": spec.to_dict() if spec is not None else {},
        "fingerprint": fingerprint or model_fingerprint(model),
        "versions": versions or package_versions(),
    }


def to_onnx(program: torch.export.ExportedProgram, graph: dict[str, Any], metadata: dict[str, Any]):
    """An ``onnx.ModelProto`` of an exported step/chunk program, with the names of ``graph``
    (a manifest entry) and ``metadata`` as JSON under :data:`METADATA_KEY`."""
    onnx_program = torch.onnx.export(
        program, input_names=[t["name"] for t in graph["inputs"]],
        output_names=[t["name"] for t in graph["outputs"]], dynamo=True, verbose=False,
    )
    proto = onnx_program.model_proto
    _name_batch_axis(proto.graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    return proto


def _name_batch_axis(graph) -> None:
    """Call the dynamic batch axis ``batch`` everywhere in an ONNX graph (the exporter names it
    after its internal symbol, e.g. ``s28``, for some models)."""
    symbols = {vi.type.tensor_type.shape.dim[0].dim_param for vi in graph.input} - {"", "batch"}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = "batch"


@dataclass
class OnnxExport:
    """The files :func:`export_onnx` wrote."""

    folder: Path
    onnx: dict[str, Path]
    programs: dict[str, Path]
    manifest: Path


def export_onnx(source: SSMModel | ServingBundle, folder: str | Path, chunk_length: int = 64, chunk_batch: int = 1,
                spec: ServingSpec | None = None, overwrite: bool = False) -> OnnxExport:
    """Write ``step.onnx``, ``chunk.onnx``, ``step.pt2``, ``chunk.pt2`` and ``streamssm.json``
    into ``folder`` for a model and its serving ``spec``, or for a loaded bundle (its spec,
    fingerprint and versions are kept).

    Refuses (ConfigError) a folder holding files unless ``overwrite``, a non-float32 model and a
    non-positive ``chunk_length`` or ``chunk_batch``."""
    try:  # the optional [export] extra; imported here so the rest of streamssm runs without it
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the export extra ({exc.name} is missing): "
                          "pip install 'streamssm[export]'") from exc
    if isinstance(source, ServingBundle):
        bundle = source
    else:  # a spec is validated against the model like export_safetensors does (ConfigError)
        bundle = ServingBundle(source, source.cfg, spec.for_model(source.cfg) if spec is not None else None)
    model = bundle.model
    _check_exportable(model)
    shapes = graph_shapes(chunk_length, chunk_batch)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output: {str(folder)!r} is a file; ONNX export writes a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"--output: folder {str(folder)!r} is not empty; pass --overwrite to replace its files")
    folder.mkdir(parents=True, exist_ok=True)
    meta = manifest(model, shapes, bundle.spec, bundle.fingerprint, bundle.versions)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():  # torch 2.11 pickles its own tree specs the deprecated way
            warnings.filterwarnings("ignore", "`isinstance\\(treespec, LeafSpec\\)` is deprecated", FutureWarning)
            onnx_paths, program_paths = {}, {}
            for kind in GRAPHS:
                log.info("exporting the %s graph", kind)
                program = export_program(model, shapes[kind])
                program_paths[kind] = folder / f"{kind}.pt2"
                torch.export.save(program, program_paths[kind])
                onnx_paths[kind] = folder / meta["graphs"][kind]["file"]
                onnx.save(to_onnx(program, meta["graphs"][kind], meta), onnx_paths[kind])
    finally:
        model.train(was_training)
    manifest_path = folder / MANIFEST_FILE
    manifest_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return OnnxExport(folder, onnx_paths, program_paths, manifest_path)
