"""``streamssm stream FILE``: stream a WAV/CSV/FASTA file to a running server and print (or save)
the results.

    streamssm stream genome.fa --url ws://127.0.0.1:8765/ --out scores.npz
    streamssm stream sensors.csv --sample-rate 100 --realtime
    streamssm stream call-16k.wav --url wss://host:8765/ --cafile cert.pem --resample client

Audio at another rate than the model's is resampled by the server (``--resample server``, the
default; results then count model-rate samples) or here, the whole file at once, before it is
streamed (``--resample client``, which asks the server for its model's rate first).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import ssl

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from streamssm.commands.parsing import ArgumentParser
from streamssm.errors import ConfigError
from streamssm.service.client import check_url, server_sample_rate
from streamssm.service.resample import resample
from streamssm.service.sources import Source, read_source, stream_source


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Stream a WAV/CSV/FASTA file to a streamssm server and "
                       "print or save the per-step results.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("file", help="audio (.wav/.flac), .csv (numeric columns) or FASTA")
    p.add_argument("--url", default="ws://127.0.0.1:8765/", help="the server (`streamssm serve`)")
    p.add_argument("--token", default=None, help="bearer token (or set STREAMSSM_TOKEN)")
    p.add_argument("--chunk", type=int, default=None, help="samples per chunk (None: --chunk-ms of audio, else 256)")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="chunk length for files with a sample rate")
    p.add_argument("--realtime", action="store_true", help="pace chunks like a live source (at the stream's sample "
                   "rate) instead of sending at full speed")
    p.add_argument("--resample", choices=("server", "client"), default="server",
                   help="who converts audio at another rate than the model's: the server (streaming), or this "
                        "client (the whole file, before streaming)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to keep retrying a refused connection (a server "
                   "still starting, as after `streamssm serve ... &`); 0: fail at once")
    p.add_argument("--cafile", default=None, help="wss://: trust this CA / self-signed certificate (PEM)")
    p.add_argument("--sample-rate", type=int, default=None, help="sample rate of a CSV (rows per second)")
    p.add_argument("--columns", default=None, help="comma-separated CSV columns (None: all numeric)")
    p.add_argument("--record", default=None, help="FASTA record (None: the first)")
    p.add_argument("--s16", action="store_true", help="send audio as s16le instead of f32le (half the bytes)")
    p.add_argument("--scores-only", action="store_true", help="ask only for per-step scores (token LMs)")
    p.add_argument("--out", default=None, help="save outputs/scores to this .npz")
    return p


def main(argv: list[str], prog: str = "streamssm stream") -> int:
    args = build_parser(prog).parse_args(argv)
    check_url(args.url)
    if args.chunk is not None and args.chunk < 1:  # -5 streamed nothing and reported success
        raise ConfigError(f"--chunk must be >= 1 samples, got {args.chunk}")
    if not 0 < args.chunk_ms < float("inf"):  # 0, negative and NaN became 1-sample chunks
        raise ConfigError(f"--chunk-ms must be a positive number of milliseconds, got {args.chunk_ms}")
    if args.out and not args.out.endswith(".npz"):  # numpy would save NAME.npz and the summary name NAME
        raise ConfigError(f"--out names the .npz file to save, got {args.out!r}")
    source = read_source(args.file, record=args.record, sample_rate=args.sample_rate,
                         columns=args.columns.split(",") if args.columns else None,
                         fmt="s16le" if args.s16 else None)
    token = args.token or os.environ.get("STREAMSSM_TOKEN")
    tls = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    if args.resample == "client" and source.format != "text" and source.sample_rate:
        source = asyncio.run(_resampled_here(source, args.url, token, tls, args.wait))
    chunk = args.chunk or (max(1, int(source.sample_rate * args.chunk_ms / 1000)) if source.sample_rate else 256)
    include = ("scores",) if args.scores_only else ("outputs", "scores")
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]streaming"), BarColumn(), TextColumn("{task.completed}/{task.total} samples"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("stream", total=len(source.data))
        client, summary = asyncio.run(stream_source(
            source, args.url, chunk=chunk, token=token, ssl=tls,
            realtime=args.realtime, results="binary", include=include, wait=args.wait,
            progress=lambda n: bar.update(task, completed=n),
        ))
    lat = np.array(client.latencies) * 1000 if client.latencies else np.zeros(1)
    summary["client"] = {"chunks": len(client.results), "reconnects": client.reconnects,
                         "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
                         "latency_ms_p99": round(float(np.percentile(lat, 99)), 3)}
    if args.out:
        arrays = {k: v for k, v in (("outputs", client.outputs()), ("scores", client.scores())) if v is not None}
        np.savez(args.out, **arrays)
        summary["saved"] = args.out
    print(json.dumps(summary, indent=2))
    return 0


async def _resampled_here(source: Source, url: str, token: str | None, tls: ssl.SSLContext | None,
                          wait: float) -> Source:
    """The source resampled (whole, at once) to the server's model rate, if that differs."""
    rate = await server_sample_rate(url, format=source.format, sample_rate=source.sample_rate,
                                    channels=source.channels, token=token, ssl=tls, wait=wait)
    if rate is None or rate == source.sample_rate:
        return source
    return dataclasses.replace(source, data=resample(source.data, source.sample_rate, rate), sample_rate=rate)
