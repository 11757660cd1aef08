"""The engine host-cost benchmarks run end to end on the CPU (small sizes): the scripts the GPU
sessions rely on for issue 19's host numbers (bench_engine_host: Scheduler + Streamer with a
zero-time model; bench_engine_process: the serve --workers engine process over real links)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def table_rows(text: str) -> list[list[float]]:
    return [[float(c) for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(r"^\| \d", line)]


def test_bench_engine_host_reports_each_stream_count(capsys):
    import bench_engine_host

    assert bench_engine_host.main(["--streams", "4,16", "--samples", "8", "--rounds", "2", "--vocab", "4"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == [4, 16] and all(r[2] > 0 and r[3] > 0 for r in rows)


@pytest.mark.timeout(300)
def test_bench_engine_process_runs_fake_workers_over_real_links(capsys):
    import bench_engine_process

    for pace in (["--pace-ms", "0"],  # at once; paced, delayed flushes, bigger calls while one is in flight
                 ["--pace-ms", "5", "--flush-us", "500", "--pipeline-fill", "1"],
                 ["--pace-ms", "5", "--batch-wait-ms", "2", "--profile", "4"]):  # the idle engine waiting; profiled
        assert bench_engine_process.main(["--streams", "12", "--samples", "16", "--rounds", "3", "--workers", "2",
                                          *pace]) == 0
        out = capsys.readouterr().out
        assert ("event loop of the engine process, 12 streams, 3 rounds (36 chunks)" in out) == ("--profile" in pace)
        assert f"pipeline fill {1 if '--pipeline-fill' in pace else 2:g})" in out  # the server's default: 2
        rows = table_rows(out.split("engine process of serve")[-1])
        assert len(rows) == 1 and rows[0][0] == 12 and rows[0][1] > 0 and rows[0][2] > 0
        assert 0 <= rows[0][4] < rows[0][3]  # waiting on the device: part of the engine thread's CPU
        assert 1 <= rows[0][5] <= 12  # model calls a round: at least one, at most one per stream
