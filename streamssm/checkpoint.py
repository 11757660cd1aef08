"""Every model file streamssm writes or reads: weights, model config, serving spec, versions.

Two formats load with :func:`load_for_serving` (and :func:`read_model_file`, which can skip
the weights):
- ``*.safetensors`` written by :func:`export_safetensors`: weights + string metadata
  ``format``, ``format_version``, ``config`` (ModelConfig JSON), ``serving``
  (:class:`~streamssm.serving.ServingSpec` JSON), ``versions``;
- Lightning ``*.ckpt`` written by the training tasks, which store :func:`training_record`
  under ``checkpoint["streamssm"]`` and keep the model at ``self.model``; loaded with
  ``weights_only=True`` (no unpickling of arbitrary objects).

Files written before the typed spec (untyped serving dicts) still load: ``ServingSpec.from_dict``
reads both layouts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model

from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec

FORMAT_VERSION = "1"
#: key of the streamssm record inside a Lightning checkpoint dict
CKPT_KEY = "streamssm"


@dataclass
class ServingBundle:
    """A model ready to run plus what the service needs to feed it."""

    model: SSMModel
    config: ModelConfig
    spec: ServingSpec | None = None  # None: the file says nothing about raw data (bare export)
    fingerprint: str = ""  # sha256 of config + weights: identifies the model in outputs/resume tokens
    versions: dict[str, str] = field(default_factory=dict)  # package versions that wrote the file


def model_fingerprint(model: SSMModel) -> str:
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a model file (recorded in every file written)."""
    out = {}
    for name in ("streamssm", "torch", "lightning"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def as_spec(spec: ServingSpec | Mapping[str, Any] | None) -> ServingSpec | None:
    """A ServingSpec from a spec, its dict form (either layout) or nothing (None / empty dict)."""
    if spec is None or isinstance(spec, ServingSpec):
        return spec
    return ServingSpec.from_dict(spec) if spec else None


def training_record(cfg: ModelConfig, spec: ServingSpec | None) -> dict[str, Any]:
    """What a training task stores under ``checkpoint[CKPT_KEY]``."""
    return {"config": cfg.to_dict(), "serving": spec.to_dict() if spec else {}, "versions": package_versions()}


@dataclass
class TrainingRecord:
    """:func:`training_record` read back: the flat ModelConfig dict, the spec, the versions."""

    config: dict[str, Any]
    spec: ServingSpec | None
    versions: dict[str, str]


def read_training_record(checkpoint: Mapping[str, Any], where: str = "checkpoint") -> TrainingRecord:
    """Read ``checkpoint[CKPT_KEY]``; ConfigError when it is missing or malformed."""
    info = checkpoint.get(CKPT_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(info, Mapping) or "config" not in info:
        raise ConfigError(f"{where} has no {CKPT_KEY!r} record: it was not written by a streamssm task")
    return TrainingRecord(dict(info["config"]), as_spec(info.get("serving")), dict(info.get("versions", {})))


def export_safetensors(model: SSMModel, path: str | Path, spec: ServingSpec | Mapping[str, Any] | None = None,
                       versions: dict[str, str] | None = None) -> Path:
    """Write weights + config + serving spec + versions to one ``.safetensors`` file.

    ``spec`` may be a ServingSpec or its dict form; it is validated against the model here
    (ConfigError), so a file that cannot be served is never written. ``versions``: the
    packages that trained the model (default: the ones running now)."""
    spec = as_spec(spec)
    if spec is not None:
        spec = spec.for_model(model.cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "streamssm",
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.cfg.to_dict()),
        "serving": spec.to_json() if spec else "{}",
        "versions": json.dumps(versions or package_versions()),
    }
    save_model(model, str(path), metadata=metadata)
    give_default_mode(path)
    return path


def give_default_mode(path: Path) -> None:
    """Give a file the mode a plain ``open(path, "w")`` would (0666 less the umask): safetensors
    0.8 writes through a private temporary file (0600) renamed into place, so an exported model
    was unreadable to the group and others, unlike every other output."""
    os.chmod(path, 0o666 & ~_umask())


_PROC_STATUS = "/proc/self/status"  # Linux: the process's umask, among other things


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status):
    ``os.umask`` can only read it by setting it, process-wide, so a file another thread created
    meanwhile would get mode 0666."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


@dataclass
class ModelFile:
    """What a model file holds, read without building the model.

    ``kind``: ``safetensors`` | ``ckpt``; ``versions``: the package versions that wrote it
    (empty when the file does not record them); ``state_dict`` only when asked for."""

    path: Path
    kind: str
    config: dict[str, Any]
    spec: ServingSpec | None
    versions: dict[str, str]
    state_dict: dict[str, torch.Tensor] | None = None


#: suffixes read as Lightning checkpoints (torch.load); anything but these and .safetensors is refused
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


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
        except DataFormatError:
            raise
        except (OSError, ValueError, SafetensorError) as exc:  # safetensors' header errors
            raise DataFormatError(
                f"cannot read {path} as safetensors (truncated, damaged or not a safetensors file): {exc}"
            ) from None
        try:  # metadata a hand-made or damaged file may lack or garble (a KeyError traceback before)
            config, serving, versions = (json.loads(meta[k]) if k in meta else default
                                         for k, default in (("config", None), ("serving", {}), ("versions", {})))
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataFormatError(f"{path}: its streamssm metadata is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise DataFormatError(f"{path}: its streamssm metadata has no model config; export it again")
        return ModelFile(path, "safetensors", config, as_spec(serving), versions, state_dict)
    if path.suffix not in CHECKPOINT_SUFFIXES:  # torch.load's errors on a CSV or FASTA misled (CLI audit)
        raise DataFormatError(f"{path} is not a model file: expected a .safetensors export or a Lightning "
                              f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFormatError(f"cannot load checkpoint {path} safely (weights_only): {str(exc) or type(exc).__name__}; "
                              f"is it a Lightning checkpoint of a streamssm task?") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a Lightning checkpoint of a streamssm task (no state_dict)")
    record = read_training_record(ckpt, where=str(path))
    prefix = "model."
    state_dict = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return ModelFile(path, "ckpt", record.config, record.spec, record.versions, state_dict if weights else None)


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
    spec = f.spec.for_model(cfg) if f.spec is not None else None
    model.to(device).eval()
    return ServingBundle(model, cfg, spec, model_fingerprint(model), f.versions)
