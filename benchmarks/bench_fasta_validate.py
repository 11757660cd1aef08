"""FASTA validation throughput: ``validate_fasta`` (blocks + byte table, one pass) vs reading
the same records through pyfaidx and ``base_codes`` (what per-window checks amount to).

    python benchmarks/bench_fasta_validate.py [--mb 100] [--records 4] [--workdir /tmp/bench_fasta]

Writes a FASTA of ``--mb`` MB (60 bases per line, soft-masked stretches, N gaps), builds its
``.fai`` (timed: pyfaidx, first open), then times each validator over all records with the
file in the page cache (best of 3). MB/s counts file bytes of sequence lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import report, run_tag  # noqa: E402

from streamssm.encoding import base_codes  # noqa: E402
from streamssm.datamodules.fasta import open_fasta, validate_fasta  # noqa: E402


def write_fasta(path: Path, mb: int, records: int, width: int = 60) -> None:
    rng = np.random.default_rng(0)
    per = mb * 1_000_000 * width // (width + 1) // records
    with open(path, "wb") as fh:
        for r in range(records):
            seq = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, per)].copy()
            seq[per // 3 : per // 3 + 5000] += 32  # soft-masked repeat (lowercase)
            seq[per // 2 : per // 2 + 10000] = ord("N")
            lines = seq[: per // width * width].reshape(-1, width)
            body = np.concatenate([lines, np.full((lines.shape[0], 1), ord("\n"), np.uint8)], axis=1)
            fh.write(f">chr{r + 1}\n".encode())
            fh.write(body.tobytes())


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--records", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/bench_fasta")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"bench_{args.mb}mb.fa"
    path.unlink(missing_ok=True)
    Path(f"{path}.fai").unlink(missing_ok=True)
    write_fasta(path, args.mb, args.records)
    mb = path.stat().st_size / 1e6
    t0 = time.perf_counter()
    fa = open_fasta(path)
    index_s = time.perf_counter() - t0
    names = list(fa.keys())
    ours = best_of(lambda: validate_fasta(path, fa, names))
    naive = best_of(lambda: [base_codes(fa[n][:]) for n in names], n=1)
    fa.close()
    rows = [("pyfaidx .fai build (first open)", index_s), ("validate_fasta (blocks + bytes.translate)", ours),
            ("pyfaidx read + base_codes", naive)]
    lines = [f"FASTA validation, {mb:.0f} MB, {args.records} records · {run_tag()}", "",
             "| step | seconds | MB/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.2f} | {mb / s:.0f} |" for name, s in rows]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
