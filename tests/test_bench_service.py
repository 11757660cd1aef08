"""bench_service, the service's headline benchmark, runs end to end on the CPU (a tiny model, two
clients, two runs per N): its rows, its per-N summary and the kept verdict."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_kept_summary_counts_an_n_kept_only_when_every_run_kept_it():
    from bench_service import kept_summary

    rows = [dict(clients=1, p99_ms=10.0, kept=True), dict(clients=1, p99_ms=12.0, kept=True),
            dict(clients=2, p99_ms=40.0, kept=True), dict(clients=2, p99_ms=70.0, kept=False)]
    text = kept_summary(rows)
    assert "N=1: kept in 2 of 2 run(s), p99 10.0-12.0 ms (median 11.0)" in text
    assert "N=2: kept in 1 of 2 run(s), p99 40.0-70.0 ms (median 55.0)" in text
    assert text.endswith("every run (p99 <= 50 ms): 1")


@pytest.mark.timeout(600)
def test_bench_service_repeats_each_n_over_real_websockets(capsys):
    import bench_service

    assert bench_service.main(["--model", "tiny", "--clients", "1,2", "--seconds", "1", "--repeats", "2",
                               "--all", "--max-wall", "300", "--pipeline-fill", "1"]) == 0  # serve takes it
    out = capsys.readouterr().out
    rows = [line.split("|")[1:4] for line in out.splitlines() if re.match(r"^\| \d", line)]
    assert [(int(n), int(run)) for n, run, _ in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(int(chunks) > 0 for _, _, chunks in rows)
    assert re.search(r"N=2: kept in [0-2] of 2 run\(s\)", out)
    assert "largest N kept real time in every run" in out
