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
"""

from __future__ import annotations

import json
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


def state_to_bytes(state: ModelState, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize a state with safetensors (tensors are copied to CPU); equal states and metadata
    give equal bytes."""
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(state):
        for field, t in zip(LayerState._fields, layer):
            tensors[f"layer{i}.{field}"] = t.detach().to("cpu").contiguous()
    meta = {"num_layers": str(len(state))}
    meta.update(metadata or {})
    return save_reproducible(tensors, meta)


def state_from_bytes(data: bytes, device: torch.device | str = "cpu") -> ModelState:
    """Inverse of :func:`state_to_bytes`; raises ``StateError`` on malformed input."""
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise StateError(f"state bytes are not a valid safetensors blob: {exc}") from exc
    layers = []
    i = 0
    while f"layer{i}.conv" in tensors:
        try:
            layers.append(
                LayerState(*(tensors[f"layer{i}.{f}"].to(device) for f in LayerState._fields))
            )
        except KeyError as exc:
            raise StateError(f"state bytes miss tensor {exc}") from exc
        i += 1
    if not layers or len(tensors) != 2 * len(layers):
        raise StateError(f"state bytes hold {len(tensors)} tensors, not a model state")
    return tuple(layers)
