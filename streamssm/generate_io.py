"""Files in and out of ``streamssm generate``: WAV prompts and continuations, sensor tables, plots.

Shape legend: l prompt / history steps, n samples, t new steps, c channels.

- :func:`write_wav`: soundfile, float32 (l, c) / (l,) in [-1, 1] (prompts are read by
  ``audio_io.read_audio``).
- :func:`read_history` / :func:`write_forecast`: CSV or Parquet (by suffix) through polars; the
  history's columns are the model's channel names.
- :func:`audio_figure` / :func:`rollout_figure`: the prompt and what the model made of it (matplotlib,
  no pyplot), written with ``save_figure`` (stream_plots' PNG writer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamssm.errors import ConfigError, DataFormatError
from streamssm.stream_plots import _save as save_figure  # noqa: F401 (re-exported: one writer of PNGs)
from streamssm.stream_plots import time_axis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TABLE_SUFFIXES = (".csv", ".parquet")


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    """wave (l,) or (l, c) float in [-1, 1] -> 16-bit PCM WAV at ``sample_rate`` Hz (clipped)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(np.asarray(wave, np.float32), -1.0, 1.0), int(sample_rate), subtype="PCM_16")
    return path


def _table_kind(path: Path, what: str) -> str:
    if path.suffix not in TABLE_SUFFIXES:
        raise ConfigError(f"{what}: expected a .csv or .parquet file, got {str(path)!r}")
    return path.suffix[1:]


def read_history(path: str | Path, channels: tuple[str, ...]) -> np.ndarray:
    """The ``channels`` columns of a CSV/Parquet table -> (l, c) float64 rows (nulls refused)."""
    from streamssm.datamodules.sensor import read_numeric_columns  # the training tables' reader: bad files named

    path = Path(path)
    _table_kind(path, "--prompt")
    if not path.is_file():
        raise DataFormatError(f"--prompt: {str(path)!r} does not exist")
    rows, _ = read_numeric_columns(path, channels)
    if rows.shape[0] == 0 or not np.isfinite(rows).all():
        raise DataFormatError(f"{path}: the history must have at least one row and no missing/NaN values")
    return rows


def write_forecast(path: str | Path, forecast: np.ndarray, channels: tuple[str, ...]) -> Path:
    """forecast (t, c) -> a table with ``step`` (1..t steps after the history) and one column per channel."""
    import polars as pl

    path = Path(path)
    kind = _table_kind(path, "--output")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame({"step": np.arange(1, forecast.shape[0] + 1),
                          **{name: forecast[:, i] for i, name in enumerate(channels)}})
    frame.write_csv(path) if kind == "csv" else frame.write_parquet(path)
    return path


def continuation_figure(before: np.ndarray, after: np.ndarray, panels: tuple[str, ...], labels: tuple[str, str],
                        title: str = "", sample_rate: float | None = None, audio: bool = False) -> Figure:
    """One panel per column: before (l, p) (prompt / history) then after (t, p) (generated / rollout),
    a dashed line where the model took over; ``audio`` fixes the y range to [-1, 1]."""
    from matplotlib.figure import Figure

    p = len(panels)
    fig = Figure(figsize=(9, 1.9 * p + 0.9))
    axes = fig.subplots(p, 1, sharex=True, squeeze=False)
    x_before, xlabel = time_axis(before.shape[0], 0, sample_rate)
    x_after, _ = time_axis(after.shape[0], before.shape[0], sample_rate)
    width = 0.6 if audio else 1.0
    for i, name in enumerate(panels):
        ax = axes[i][0]
        ax.plot(x_before, before[:, i], color="0.35", linewidth=width, label=labels[0])
        ax.plot(x_after, after[:, i], color="tab:blue", linewidth=width, label=labels[1])
        ax.axvline(x_after[0], color="tab:red", linewidth=0.8, linestyle="--")
        ax.set_ylabel(name)
        if audio:
            ax.set_ylim(-1.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="upper left", fontsize=8)
    axes[-1][0].set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def audio_figure(prompt: np.ndarray, continuations: np.ndarray, sample_rate: int, title: str = "",
                 max_samples: int = 4) -> Figure:
    """prompt (l,) then each continuation (n, t), one panel per sample (at most ``max_samples``)."""
    n = min(continuations.shape[0], max_samples)
    return continuation_figure(np.repeat(prompt[:, None], n, axis=1), continuations[:n].T,
                               tuple(f"sample {i}" for i in range(n)), ("prompt", "generated"), title,
                               sample_rate, audio=True)


def rollout_figure(history: np.ndarray, forecast: np.ndarray, channels: tuple[str, ...], title: str = "",
                   sample_rate: float | None = None, max_channels: int = 4) -> Figure:
    """history (l, c) and the rollout (t, c) after it, one panel per channel (at most ``max_channels``)."""
    c = min(len(channels), max_channels)
    return continuation_figure(history[:, :c], forecast[:, :c], tuple(channels[:c]),
                               ("history", "rollout (own predictions fed back)"), title, sample_rate)
