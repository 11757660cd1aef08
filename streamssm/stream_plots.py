"""Pictures of a streamed signal with the model's per-step outputs (matplotlib, no pyplot).

    forecast_figure(signal (t, c), forecast (t, c), zoom=300)       sensor / float audio models
    surprisal_figure(surprisal_bits (t,), signal=None)              token models (DNA, mu-law audio)
    plot_forecast / plot_surprisal: the same, written to a PNG

``forecast[t]`` is the model's prediction of ``signal[t + 1]`` made after seeing ``signal[:t+1]``,
so it is drawn one step to the right of where it was made. The x axis is in seconds when the
``sample_rate`` (Hz) is given, else in steps (``step_unit``, e.g. ``base`` for DNA). The forecast
figure shows one panel per channel (at most ``max_channels``) over the last ``zoom`` steps, where
single steps can be told apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamssm.errors import ShapeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def time_axis(n: int, start: int = 0, sample_rate: float | None = None, step_unit: str = "step") -> tuple[np.ndarray, str]:
    """x values of steps ``start .. start + n - 1`` and the axis label: seconds at ``sample_rate``, else steps."""
    steps = np.arange(start, start + n, dtype=np.float64)
    if sample_rate:
        return steps / float(sample_rate), "time (s)"
    return steps, step_unit


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def forecast_figure(signal: np.ndarray, forecast: np.ndarray, title: str = "", max_channels: int = 3,
                    zoom: int | None = 300, sample_rate: float | None = None, step_unit: str = "step") -> Figure:
    """Each channel's signal and the one-step-ahead forecast over the last ``zoom`` steps (None: all)."""
    from matplotlib.figure import Figure

    signal, forecast = np.asarray(signal, np.float32), np.asarray(forecast, np.float32)
    if signal.ndim == 1:
        signal, forecast = signal[:, None], forecast.reshape(-1, 1)
    if signal.shape != forecast.shape:
        raise ShapeError(f"forecast_figure: signal {signal.shape} and forecast {forecast.shape} must match")
    t = signal.shape[0]
    start = max(0, t - zoom) if zoom else 0
    x, xlabel = time_axis(t - start, start, sample_rate, step_unit)
    channels = min(signal.shape[1], max_channels)
    fig = Figure(figsize=(9, 1.9 * channels + 0.9))
    axes = fig.subplots(channels, 1, sharex=True, squeeze=False)
    for ch in range(channels):
        ax = axes[ch][0]
        ax.plot(x, signal[start:, ch], color="0.35", linewidth=1.0, label="signal")
        # the forecast made at step s is of step s + 1
        ax.plot(x[1:], forecast[start:-1, ch], color="tab:orange", linewidth=1.0, label="streamed forecast (t+1)")
        ax.set_ylabel(f"channel {ch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="upper right", fontsize=8)
    shown = f"last {t - start} of {t} steps" if start else f"all {t} steps"
    more = f", first {channels} of {signal.shape[1]} channels" if channels < signal.shape[1] else ""
    axes[-1][0].set_xlabel(f"{xlabel} ({shown}{more})")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def surprisal_figure(surprisal_bits: np.ndarray, title: str = "", signal: np.ndarray | None = None,
                     uniform_bits: float | None = None, smooth: int = 25, sample_rate: float | None = None,
                     step_unit: str = "step") -> Figure:
    """Per-step surprisal -log2 p(x_t | x_<t) as streamed (and its running mean), optionally
    under the raw signal; ``uniform_bits`` draws the no-model baseline."""
    from matplotlib.figure import Figure

    bits = np.asarray(surprisal_bits, np.float64).reshape(-1)
    rows = 2 if signal is not None else 1
    fig = Figure(figsize=(9, 2.6 * rows + 0.6))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    x, xlabel = time_axis(bits.size, 0, sample_rate, step_unit)
    if signal is not None:
        axes[0][0].plot(x, np.asarray(signal, np.float32).reshape(bits.size, -1)[:, 0], color="0.35", linewidth=0.8)
        axes[0][0].set_ylabel("signal")
    ax = axes[-1][0]
    ax.plot(x, bits, color="tab:blue", linewidth=0.5, alpha=0.45, label=f"surprisal per {step_unit}")
    k = max(1, min(smooth, bits.size))
    ax.plot(x[k - 1:], np.convolve(bits, np.ones(k) / k, mode="valid"), color="tab:blue", linewidth=1.5,
            label=f"running mean ({k} {step_unit}s)")
    if uniform_bits is not None:
        ax.axhline(uniform_bits, color="tab:red", linestyle="--", linewidth=1.0, label="no model (uniform)")
    ax.set_ylabel(f"surprisal (bits per {step_unit})")
    ax.set_xlabel(xlabel)
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_forecast(signal: np.ndarray, forecast: np.ndarray, out_png: str | Path, title: str = "",
                  **options: Any) -> Path:
    """:func:`forecast_figure` written to ``out_png``."""
    return _save(forecast_figure(signal, forecast, title, **options), out_png)


def plot_surprisal(surprisal_bits: np.ndarray, out_png: str | Path, title: str = "", **options: Any) -> Path:
    """:func:`surprisal_figure` written to ``out_png``."""
    return _save(surprisal_figure(surprisal_bits, title, **options), out_png)
