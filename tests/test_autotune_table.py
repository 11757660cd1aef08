"""benchmarks/autotune_table.py ranks the configs of cached Triton autotuning results."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import autotune_table  # noqa: E402


def result(key, timings):
    """An autotuning record as Triton writes it: (config, [median, p20, p80] in ms) per config tried."""
    configs = [{"kwargs": {"BLOCK_T": bt, "BLOCK_I": 32}, "num_warps": w, "num_stages": 1} for bt, w in
               [(32, 8), (64, 4), (128, 8)]]
    return {"key": key, "configs_timings": [[c, [t, t, t]] for c, t in zip(configs, timings)]}


def write_archive(path: Path, files: dict[str, dict]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, record in files.items():
            data = json.dumps(record).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("as_dir", [False, True], ids=["archive", "directory"])
def test_ranks_configs_per_kernel_and_key(tmp_path, capsys, as_dir):
    files = {"./AB/_dx_kernel.autotune.json": result([24, 64, "tf32", "torch.bfloat16"], [0.9, 0.3, float("inf")]),
             "./CD/_dc_kernel.autotune.json": result([8, 64, "ieee", "torch.float32"], [0.1, 0.2, 0.4]),
             "./CD/other.json": {"not": "autotuning"}}
    if as_dir:
        for name, record in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(json.dumps(record))
        source = tmp_path
    else:
        source = tmp_path / "cache.tar.gz"
        write_archive(source, files)
    assert autotune_table.main([str(source), "--kernels", "dx", "--top", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| _")]
    # the dc kernel filtered out; the dtype left out of the key; the config that failed (inf) not ranked
    assert rows == ["| _dx_kernel | [24, 64, 'tf32'] | 64 x 32 w4s1: 300 · 32 x 32 w8s1: 900 | 32 x 32 w8s1: 900 | 3.00x |"]


def test_configs_differing_only_in_their_register_cap_are_told_apart():
    """Two BLOCK_D 8 configs, one capped at 128 registers (Triton writes maxnreg null when uncapped)."""
    plain = {"kwargs": {"BLOCK_D": 8}, "num_warps": 1, "num_stages": 1, "maxnreg": None}
    capped = dict(plain, maxnreg=128)
    record = {"key": [1536], "configs_timings": [[plain, [7.7, 7.7, 7.7]], [capped, [5.2, 5.2, 5.2]]]}
    assert [(round(us), name) for us, name in autotune_table.ranked(record)] == [(5200, "8 w1s1 r128"), (7700, "8 w1s1")]


def test_an_unreadable_archive_is_a_clear_error(tmp_path, capsys):
    """An empty file (the archive of a run killed while writing it) exits 2 naming the problem."""
    empty = tmp_path / "triton_autotune.tar.gz"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        autotune_table.main([str(empty)])
    assert exit_info.value.code == 2
    assert "not a readable .tar.gz of autotuning results" in capsys.readouterr().err
