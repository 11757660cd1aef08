"""Every config's time, per Triton kernel and autotuning key, from a cache of autotuning results.

``gpu_serving_session.sh`` brings back the GPU's results as ``triton_autotune.tar.gz`` (Triton's
``*.autotune.json`` files, written with ``TRITON_CACHE_AUTOTUNING=1``): each holds the key values
of one call and the time of every config the autotuner tried there. This prints them ranked, so
that a config list can be judged (which configs ever win, how far behind the first config is)
without a GPU::

    python benchmarks/autotune_table.py .whl/triton_autotune.tar.gz --kernels _chunk_scan_bwd_dx_kernel
    python benchmarks/autotune_table.py ~/.triton/cache --kernels fused --top 3

Columns: the kernel, its key values (dtypes left out), the fastest configs with their times
(µs, the autotuner's median), the slowest, and how much slower the list's first config is than
the winner. A config reads ``tile x tile wWARPS sSTAGES``, and `` rMAXNREG`` where it caps the
registers per thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

SUFFIX = ".autotune.json"


def records(source: Path) -> Iterator[tuple[str, dict]]:
    """(kernel name, parsed file) of every autotuning result in a directory tree or a .tar.gz."""
    if source.is_dir():
        for path in sorted(source.rglob(f"*{SUFFIX}")):
            yield path.name[:-len(SUFFIX)], json.loads(path.read_text())
        return
    with tarfile.open(source) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith(SUFFIX):
                yield Path(member.name).name[:-len(SUFFIX)], json.load(tar.extractfile(member))


def config_name(config: dict) -> str:
    """e.g. "64 x 32 w4s1", with " r128" where the config caps the registers per thread (maxnreg)."""
    tile = " x ".join(str(v) for v in config["kwargs"].values())
    cap = f" r{config['maxnreg']}" if config.get("maxnreg") else ""
    return f"{tile} w{config['num_warps']}s{config['num_stages']}{cap}"


def microseconds(timing: list | float) -> float:
    """A config's time as Triton records it (ms, or [median, p20, p80] ms) in µs: the median."""
    return (timing[0] if isinstance(timing, list) else timing) * 1000.0


def ranked(result: dict) -> list[tuple[float, str]]:
    """(µs, config) of every config tried, fastest first; a config that failed to run is left out."""
    rows = []
    for config, timing in result["configs_timings"]:
        us = microseconds(timing)
        if us != float("inf"):
            rows.append((us, config_name(config)))
    return sorted(rows)


def table(source: Path, kernels: list[str], top: int) -> list[str]:
    lines = ["| kernel | key | fastest (µs) | slowest | first config / fastest |", "|---|---|---|---|---|"]
    for name, result in records(source):
        if kernels and not any(k in name for k in kernels):
            continue
        times = ranked(result)
        if not times:
            continue
        key = [v for v in result["key"] if not (isinstance(v, str) and v.startswith("torch."))]
        first_us = microseconds(result["configs_timings"][0][1])
        best = " · ".join(f"{c}: {us:.0f}" for us, c in times[:top])
        lines.append(f"| {name} | {key} | {best} | {times[-1][1]}: {times[-1][0]:.0f} | {first_us / times[0][0]:.2f}x |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a triton_autotune.tar.gz or a Triton cache directory")
    ap.add_argument("--kernels", default="", help="comma-separated parts of kernel names (default: all)")
    ap.add_argument("--top", type=int, default=4, help="fastest configs shown per key")
    args = ap.parse_args(argv)
    if not args.source.exists():
        ap.error(f"{args.source}: no such file or directory")
    try:
        print("\n".join(table(args.source, [k for k in args.kernels.split(",") if k], args.top)))
    except (tarfile.TarError, EOFError, OSError) as err:  # e.g. the empty archive of a run killed while writing it
        ap.error(f"{args.source}: not a readable .tar.gz of autotuning results ({err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
