"""``streamssm info [FILE]``: a model file's card, or (no file) versions, devices and the kernel
backend each op would use here.

    streamssm info                         # this machine: versions, device, kernel backends
    streamssm info model.safetensors       # a model card: config, serving spec, parameters, fingerprint
    streamssm info last.ckpt --json        # the same as JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from streamssm.checkpoint import load_for_serving
from streamssm.commands.parsing import ArgumentParser


def environment() -> dict[str, str]:
    """Versions, the device and the kernel backend each op would use on this machine."""
    import triton

    from streamssm import __version__
    from streamssm.kernels._common import choose_backend, interpreting

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {
        "streamssm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "TRITON_INTERPRET": "1" if interpreting() else "0",
    }
    for op in ("selective_scan", "ssd_scan", "causal_conv1d"):
        rows[f"backend[{op}]"] = choose_backend(op, "auto", device)
    return {k: str(v) for k, v in rows.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(path: str | Path) -> dict[str, Any]:
    """A model file's card: what it is, what it serves, its size and identity (JSON-able)."""
    path = Path(path)
    bundle = load_for_serving(path, "cpu")
    return {
        "file": str(path),
        "format": "safetensors export" if path.suffix == ".safetensors" else "Lightning checkpoint",
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "fingerprint": bundle.fingerprint,
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
        "config": bundle.config.to_dict(),
        "serving": None if bundle.spec is None else {**bundle.spec.to_dict(), "stream": bundle.spec.stream_start()},
        "written_by": dict(bundle.versions),
    }


def _print_rows(rows: Mapping[str, Any], indent: str = "") -> None:
    width = max((len(k) for k in rows), default=0)
    for key, value in rows.items():
        if isinstance(value, Mapping):
            print(f"{indent}{key}:")
            _print_rows(value, indent + "  ")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"{indent}{key.ljust(width)}  {'-' if shown in (None, '') else shown}")


def main(argv: list[str], prog: str = "streamssm info") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("file", nargs="?", default=None,
                        help="model file (.safetensors export or Lightning .ckpt); none: this machine")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    rows: dict[str, Any] = environment() if args.file is None else model_card(args.file)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_rows(rows)
    return 0
