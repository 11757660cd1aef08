"""``ServeConfig``: the settings of one server, declared once.

Each field is also a ``streamssm serve`` option (``max_streams`` -> ``--max-streams``) and a
key of a ``serve --config`` YAML file: ``streamssm.commands.serve`` builds its parser from these
fields, their types and their ``help``. Validated in ``__post_init__`` (one ConfigError naming
every problem), so a server built from Python gets the same checks as one built from the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from streamssm.engine import ENGINES
from streamssm.errors import ConfigError

#: the ``dtype`` choices and the torch dtype of each
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _option(default: Any, help: str) -> Any:
    """A field with its ``--help`` text (read by the serve command's parser)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    """Server settings (the ``streamssm serve`` options; sizes in bytes, times in seconds)."""

    host: str = _option("127.0.0.1", "interface to bind (127.0.0.1: loopback only)")
    port: int = _option(8765, "TCP port (0: any free port)")
    device: str = _option("cpu", "cpu, cuda, cuda:1, ... (the serve command also takes auto: cuda when present)")
    dtype: Literal["float32", "bfloat16", "float16"] = _option("float32", "model compute dtype")
    token: str | None = _option(None, "require 'Authorization: Bearer TOKEN' (or set STREAMSSM_TOKEN); "
                                      "null: no auth ('' is refused)")
    max_streams: int = _option(64, "concurrent streams (state pool size)")
    max_pending: int = _option(256, "connections per process not yet streaming (handshakes, waiting for start); "
                                    "past this the oldest is dropped, so idle sockets cannot lock clients out")
    max_frame_bytes: int = _option(1 << 20, "largest data frame accepted")
    max_result_bytes: int = _option(16 << 20, "largest result of one frame (protocol.result_bytes)")
    replay_bytes: int = _option(16 << 20, "unacknowledged results kept per stream for resume")
    slice_samples: int = _option(640, "samples of one stream per model call: a 10 / 20 / 40 ms frame at 16 kHz "
                                      "runs whole in one call (smaller slices split them into extra calls); "
                                      "bench_abuse: canary p99 vs slice")
    idle_timeout: float = _option(60.0, "seconds without a message")
    queue_depth: int = _option(8, "unanswered chunks per stream")
    resume_ttl: float = _option(300.0, "seconds a disconnected stream is kept")
    state_dir: str | None = _option(None, "persist parked streams here (survive a restart)")
    write_ahead_interval: float = _option(5.0, "seconds between writes of live streams to --state-dir "
                                               "(a crash loses at most this)")
    max_parked: int = _option(1024, "parked streams kept (oldest evicted)")
    max_parked_bytes: int = _option(1 << 30, "bytes of parked streams kept")
    nan_policy: Literal["reject", "zero"] = _option("reject", "NaN/inf samples: refuse the frame, or read them as 0")
    certfile: str | None = _option(None, "TLS certificate (PEM)")
    keyfile: str | None = _option(None, "TLS private key (PEM)")
    ping_interval: float | None = _option(20.0, "seconds between websocket pings (null: none)")
    batch_wait: float = _option(0.0, "seconds the idle engine may wait for streams with nothing pending "
                                     "before a model call (0: never); on a CPU, where a call's fixed cost "
                                     "dominates, a few ms let staggered streams share one call")
    pipeline_fill: float = _option(2.0, "while a model call is in flight, launch the next before collecting it "
                                        "only when this many streams per stream of that call (or all live "
                                        "streams) have samples pending (larger: fewer, bigger calls, which "
                                        "cost the GPU less per stream; on the H100 host 2 held 384 clients "
                                        "of the d512 LM at p99 38-39 ms in two of two runs, 1 in one of two)")
    batching: Literal["uniform", "greedy"] = _option(
        "uniform", "chunks per stream per model call: equal counts (uniform) or all pending (greedy)")
    engine: Literal["auto", "eager", "graphs", "compiled"] = _option(
        "auto", "model calls: auto (graphs on CUDA, else eager), eager, graphs (CUDA graphs), "
                "compiled (CPU, torch.compile; eager with a warning when no C++ compiler works; slower "
                "than eager for chunked calls since eager runs C kernels: 21 vs 10 ms a call of the "
                "demo model at 12 x 320 samples, after a 76 s compile)")
    workers: int = _option(1, "websocket front-end processes (Linux: one port, SO_REUSEPORT); 1: the whole "
                                "server in one process. One event loop carries ~130 real-time 20 ms clients, so a "
                                "GPU server for more needs more (the model stays in one engine process)")
    prepare: bool = _option(False, "capture the CUDA graphs / compile the programs at start-up, "
                                   "not at the first calls (start-up takes longer)")

    def __post_init__(self) -> None:
        problems = []
        positive = {"max_streams": 1, "max_pending": 1, "max_frame_bytes": 64, "max_result_bytes": 1024, "replay_bytes": 0,
                    "slice_samples": 1, "queue_depth": 1, "workers": 1, "max_parked": 1, "max_parked_bytes": 1}
        for name, least in positive.items():
            if getattr(self, name) < least:
                problems.append(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:  # the OS took 99999 as 99999 mod 65536, a port nobody asked for
            problems.append(f"port must be 0..65535 (0: any free port), got {self.port}")
        if self.idle_timeout <= 0:
            problems.append(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        if self.resume_ttl < 0:
            problems.append(f"resume_ttl must be >= 0, got {self.resume_ttl}")
        if not 0 <= self.batch_wait <= 1:
            problems.append(f"batch_wait must be 0..1 seconds (every stream waits it whenever one pauses), "
                            f"got {self.batch_wait}")
        if not 0 <= self.pipeline_fill <= 64:
            problems.append(f"pipeline_fill must be 0..64 (streams pending per stream in flight), "
                            f"got {self.pipeline_fill}")
        if self.write_ahead_interval <= 0:
            problems.append(f"write_ahead_interval must be > 0 seconds, got {self.write_ahead_interval}")
        if self.token is not None and not self.token.strip():
            problems.append("token is empty: give a real bearer token, or none to run without auth")
        if self.nan_policy not in ("reject", "zero"):
            problems.append(f"nan_policy must be 'reject' or 'zero', got {self.nan_policy!r}")
        if self.batching not in ("uniform", "greedy"):
            problems.append(f"batching must be 'uniform' or 'greedy', got {self.batching!r}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if (self.certfile is None) != (self.keyfile is None):
            problems.append("TLS needs both certfile and keyfile")
        if problems:
            raise ConfigError("invalid server settings: " + "; ".join(problems))
