"""``streamssm info``: versions, devices and the kernel backend each op would use here."""

from __future__ import annotations

import argparse
import platform

import torch

from streamssm.kernels._common import choose_backend, interpreting


def main(argv: list[str], prog: str = "streamssm info") -> int:
    argparse.ArgumentParser(prog=prog, description=__doc__).parse_args(argv)
    import triton

    from streamssm import __version__

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        ("streamssm", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton.__version__),
        ("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        ("TRITON_INTERPRET", "1" if interpreting() else "0"),
    ]
    rows += [(f"backend[{op}]", choose_backend(op, "auto", device)) for op in ("selective_scan", "ssd_scan", "causal_conv1d")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0
