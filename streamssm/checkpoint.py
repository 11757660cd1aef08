"""Load and save models for serving: one file holds weights, model config and serving metadata.

Two formats load with :func:`load_for_serving`:
- ``*.safetensors`` written by :func:`export_safetensors` (weights + metadata JSON strings);
- Lightning ``*.ckpt`` written by the training tasks; loaded with ``weights_only=True`` (no
  unpickling of arbitrary objects). The task stores ``checkpoint["streamssm"] =
  {"config": ModelConfig dict, "serving": metadata dict}`` and keeps the model at ``self.model``.

Serving metadata (JSON) says how to turn raw stream data into model inputs: kind, tokenizer
or mu-law settings, sample rate, channels, normalization statistics, head semantics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_model

from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ModelConfig, SSMModel

FORMAT_VERSION = "1"


@dataclass
class ServingBundle:
    """A model ready to run plus what the service needs to feed it."""

    model: SSMModel
    config: ModelConfig
    serving: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # sha256 of config + weights: identifies the model in outputs/resume tokens
    versions: dict[str, str] = field(default_factory=dict)  # package versions that wrote the file


def model_fingerprint(model: SSMModel) -> str:
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def export_safetensors(model: SSMModel, path: str | Path, serving: dict[str, Any] | None = None,
                       versions: dict[str, str] | None = None) -> Path:
    """Write weights + config + serving metadata (+ the versions that trained it) to one ``.safetensors`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "streamssm",
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.cfg.to_dict()),
        "serving": json.dumps(serving or {}),
    }
    if versions:
        metadata["versions"] = json.dumps(versions)
    save_model(model, str(path), metadata=metadata)
    return path


@dataclass
class ModelFile:
    """What a model file holds, read without building the model.

    ``kind``: ``safetensors`` | ``ckpt``; ``versions``: the package versions that wrote it
    (empty when the file does not record them); ``state_dict`` only when asked for."""

    path: Path
    kind: str
    config: dict[str, Any]
    serving: dict[str, Any]
    versions: dict[str, str]
    state_dict: dict[str, torch.Tensor] | None = None


def read_model_file(path: str | Path, weights: bool = False) -> ModelFile:
    """Read a ``.safetensors`` export or a Lightning ``.ckpt`` of a streamssm task.

    ``weights=False`` reads a safetensors file's header only. Raises DataFormatError/ConfigError
    naming the file when it is missing or not a streamssm model file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"model file {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "streamssm":
                    raise DataFormatError(
                        f"{path} is a safetensors file but not a streamssm export (no streamssm metadata)")
                state_dict = {k: f.get_tensor(k) for k in f.keys()} if weights else None
        except (OSError, ValueError) as exc:  # safetensors' header errors
            raise DataFormatError(f"cannot read {path} as safetensors: {exc}") from None
        return ModelFile(path, "safetensors", json.loads(meta["config"]), json.loads(meta.get("serving", "{}")),
                         json.loads(meta.get("versions", "{}")), state_dict)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFormatError(f"cannot load checkpoint {path} safely (weights_only): {exc}") from exc
    if not isinstance(ckpt, dict) or "streamssm" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a streamssm training checkpoint (no 'streamssm' entry)")
    prefix = "model."
    state_dict = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    info = ckpt["streamssm"]
    return ModelFile(path, "ckpt", info["config"], info.get("serving", {}), dict(info.get("versions", {})),
                     state_dict if weights else None)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; other names as torch reads
    them. Raises ConfigError for a CUDA device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...): {exc}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: no CUDA device is available on this machine; "
                              f"use --device cpu, or --device auto (cuda when present, else cpu)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def load_for_serving(path: str | Path, device: torch.device | str = "cpu") -> ServingBundle:
    """Load a ``.safetensors`` export or a Lightning ``.ckpt`` of a streamssm task."""
    f = read_model_file(path, weights=True)
    cfg = ModelConfig.from_dict(f.config)
    model = SSMModel(cfg)
    try:
        model.load_state_dict(f.state_dict, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys and shape mismatches, all listed by torch
        raise DataFormatError(f"checkpoint weights do not fit the config: {exc}") from exc
    model.to(device).eval()
    return ServingBundle(model, cfg, f.serving, model_fingerprint(model), f.versions)
