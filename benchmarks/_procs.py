"""What the benchmarks read of a server's processes from Linux /proc (nothing elsewhere): its
worker processes, their threads' CPU seconds and their memory. No torch import (client
processes of the benchmarks import this too)."""

from __future__ import annotations

import os
from pathlib import Path


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid``: the workers of a ``serve --workers`` server."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds used so far by the threads of ``pid``: ``loop`` (the main thread: a server's
    event loop) and ``workers`` (every other thread: the engine's model calls, torch's pools)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {"loop": 0.0, "workers": 0.0}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out["loop" if int(task.name) == pid else "workers"] += (int(fields[11]) + int(fields[12])) / tick
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of ``pid`` and its child processes together, in MB."""
    now = peak = 0.0
    for p in (pid, *child_processes(pid)):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        now += int(fields["VmRSS"].split()[0]) / 1024
        peak += int(fields["VmHWM"].split()[0]) / 1024
    return now, peak
