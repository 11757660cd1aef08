"""Constant-size recurrent state of a model.

Shapes (per layer):
    conv: (batch, conv_dim, d_conv - 1)   the last d_conv-1 inputs of the causal conv
    ssm:  fp32; Mamba-1 (batch, d_inner, d_state); Mamba-2 (batch, heads, headdim, d_state)
Sliding-window attention layers of hybrids (``streamssm/layers/attention.py``) use the same
two fields, so pools, snapshots and serialization treat every layer alike:
    conv: (batch, 1) int64                 steps seen (the next position)
    ssm:  fp32 (batch, 2, heads, window, head_dim)   ring buffer of the last keys and values

``ModelState`` is a tuple of ``LayerState`` (one per layer). Both are plain pytrees, so
they pass through ``torch.compile`` and ``torch.export`` unregistered. The size never
depends on how much of a stream has been seen.

One serialized form for every saved state (Streamer snapshots, the service's parked and
written-ahead streams, zarr resume records): :func:`state_to_bytes` writes reproducible
safetensors (tensors ``layer<i>.conv`` / ``layer<i>.ssm``, named extra tensors, string
metadata with ``num_layers``); :func:`read_state_record` reads it back as a
:class:`StateRecord`; :func:`read_state_metadata` is the one reader of its metadata (header
only, no tensors).
"""

from __future__ import annotations

import json
import os
import struct
from typing import NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from streamssm.errors import StateError


class LayerState(NamedTuple):
    conv: torch.Tensor
    ssm: torch.Tensor


ModelState = tuple[LayerState, ...]


def state_nbytes(state: ModelState) -> int:
    """Bytes held by a model state (all layers, all streams in the batch)."""
    return sum(t.numel() * t.element_size() for layer in state for t in layer)


def state_batch_size(state: ModelState) -> int:
    return int(state[0].conv.shape[0])


def select_streams(state: ModelState, index: torch.Tensor) -> ModelState:
    """Rows ``index`` (batch',) of every tensor of ``state`` (a copy)."""
    return tuple(LayerState(*(t.index_select(0, index) for t in layer)) for layer in state)


def write_streams(pool: ModelState, index: torch.Tensor, values: ModelState) -> None:
    """In place: ``pool[...][index] = values[...]`` for every tensor."""
    for pool_layer, value_layer in zip(pool, values, strict=True):
        for p, v in zip(pool_layer, value_layer, strict=True):
            p.index_copy_(0, index, v.to(p.dtype))


def save_reproducible(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``safetensors.torch.save`` with its JSON header rewritten with sorted keys.

    safetensors writes the header's maps in hash order, so equal inputs gave different bytes
    from call to call. Only the header moves (data offsets are relative to the end of the
    header); it stays space-padded to a multiple of 8 bytes as the format requires."""
    blob = st_save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


class StateRecord(NamedTuple):
    """What one serialized state holds: the state, named extra tensors (e.g. the Streamer's
    ``last_output``) and string metadata (``num_layers`` included)."""

    state: ModelState
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def state_to_bytes(state: ModelState, metadata: dict[str, str] | None = None,
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """Serialize a state with safetensors (tensors are copied to CPU); equal inputs give equal
    bytes. Layer ``i`` is stored as ``layer{i}.conv`` / ``layer{i}.ssm`` with whatever shape the
    tensors have (the Streamer stores one stream without its batch axis); ``extra_tensors``
    (names not starting with ``layer``) ride along; metadata gets ``num_layers``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in (extra_tensors or {}).items():
        if name.startswith("layer"):
            raise StateError(f"extra tensor name {name!r} collides with the layer tensors (layer<i>.<field>)")
        tensors[name] = t.detach().to("cpu").contiguous()
    for i, layer in enumerate(state):
        for field, t in zip(LayerState._fields, layer):
            tensors[f"layer{i}.{field}"] = t.detach().to("cpu").contiguous()
    meta = {"num_layers": str(len(state))}
    meta.update(metadata or {})
    return save_reproducible(tensors, meta)


def read_state_metadata(source: bytes | str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of state bytes (or of a state file, reading its header only); no
    tensor is loaded. ``StateError`` when the header is truncated, not JSON or not a map of
    strings."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(source, "rb") as f:
            head = f.read(8)
            # at most the rest of the file: a damaged length field must not ask for exabytes
            rest = max(0, os.fstat(f.fileno()).st_size - 8)
            data = head + f.read(min(int.from_bytes(head, "little"), rest)) if len(head) == 8 else head
    if len(data) < 8:
        raise StateError(f"state bytes are not a valid safetensors blob: {len(data)} bytes, no header length")
    (n,) = struct.unpack("<Q", data[:8])
    if len(data) < 8 + n:
        raise StateError(f"state bytes are not a valid safetensors blob: header of {n} bytes, "
                         f"only {len(data) - 8} present (truncated)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"state bytes are not a valid safetensors blob: header is not JSON ({exc})") from exc
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise StateError(f"state bytes are not a valid safetensors blob: metadata is not a map of strings: {meta!r}")
    return meta


def read_state_record(data: bytes, device: torch.device | str = "cpu") -> StateRecord:
    """Inverse of :func:`state_to_bytes`; ``StateError`` on malformed input."""
    metadata = read_state_metadata(data)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise StateError(f"state bytes are not a valid safetensors blob: {exc}") from exc
    layers = []
    while f"layer{len(layers)}.conv" in tensors or f"layer{len(layers)}.ssm" in tensors:
        i = len(layers)
        try:
            layers.append(LayerState(*(tensors.pop(f"layer{i}.{f}").to(device) for f in LayerState._fields)))
        except KeyError as exc:
            raise StateError(f"state bytes miss tensor {exc}") from exc
    stray = sorted(k for k in tensors if k.startswith("layer"))
    if not layers or stray:
        raise StateError(f"state bytes hold no model state (layer0..layer<n-1> conv/ssm); layer tensors: {stray}")
    return StateRecord(tuple(layers), {k: t.to(device) for k, t in tensors.items()}, metadata)


def state_from_bytes(data: bytes, device: torch.device | str = "cpu") -> ModelState:
    """The state of bytes written by :func:`state_to_bytes` without extra tensors."""
    record = read_state_record(data, device)
    if record.tensors:
        raise StateError(f"state bytes hold tensors {sorted(record.tensors)} besides the model state")
    return record.state
