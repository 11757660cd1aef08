"""benchmarks/gpu_serving_session.sh carries Triton's autotuning results from one device call to
the next: packed from the cache on exit, unpacked into an empty cache at the next start; and its
exit status says whether a command of the part failed."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_serving_session.sh"


def _run(out: Path, cache: Path, archive: Path) -> subprocess.CompletedProcess:
    """The script with a part it does not know (usage, exit 2: no GPU work), its exit trap included."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(out.parent), "OUT": str(out), "TRITON_CACHE_DIR": str(cache),
           "AUTOTUNE_ARCHIVE": str(archive)}
    return subprocess.run(["bash", str(SCRIPT), "no-such-part"], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_autotuning_results_survive_a_fresh_machine(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out1"
    (cache / "ab12").mkdir(parents=True)
    (cache / "ab12" / "_kernel.autotune.json").write_text('{"configs_timings": []}')
    (cache / "ab12" / "_kernel.cubin").write_bytes(b"\0" * 64)  # compiled code stays behind
    first = _run(out, cache, tmp_path / "absent.tar.gz")
    assert first.returncode == 2 and "usage" in first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["triton_autotune.tar.gz"]  # written whole, then renamed
    with tarfile.open(out / "triton_autotune.tar.gz") as tar:
        assert sorted(Path(n).as_posix() for n in tar.getnames() if n.endswith(".json")) == [
            "ab12/_kernel.autotune.json"]
        assert not [n for n in tar.getnames() if n.endswith(".cubin")]
    fresh = tmp_path / "fresh-cache"
    second = _run(tmp_path / "out2", fresh, out / "triton_autotune.tar.gz")
    assert second.returncode == 2
    assert (fresh / "ab12" / "_kernel.autotune.json").read_text() == '{"configs_timings": []}'
    with tarfile.open(tmp_path / "out2" / "triton_autotune.tar.gz") as tar:  # passed on again
        assert any(n.endswith("ab12/_kernel.autotune.json") for n in tar.getnames())


@pytest.mark.parametrize("status", [0, 1])
def test_exit_status_says_whether_a_command_failed(tmp_path, status):
    """The ``tests`` part with ``python`` replaced by a stub that exits ``status``: the part's
    pipelines (pytest | tail | tee) end 0 either way without pipefail; the script must not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"#!/bin/sh\nexit {status}\n")
    (bin_dir / "python").chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out),
           "TRITON_CACHE_DIR": str(tmp_path / "cache"), "AUTOTUNE_ARCHIVE": str(tmp_path / "absent.tar.gz")}
    done = subprocess.run(["bash", str(SCRIPT), "tests"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert ("failed or timed out" in done.stderr) == bool(status)
    assert (out / "tests.txt").exists()  # the tables are written either way
