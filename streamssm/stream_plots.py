"""Pictures of a streamed signal with the model's per-step outputs (matplotlib, Agg).

    plot_forecast(signal (t, c), forecast (t, c), out_png)      sensor / float audio models
    plot_surprisal(surprisal_bits (t,), out_png, signal=None)   token models (DNA, mu-law audio)

``forecast[t]`` is the model's prediction of ``signal[t + 1]`` made after seeing ``signal[:t+1]``,
so it is drawn one step to the right of where it was made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamssm.errors import ShapeError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, title: str, out_png: str | Path) -> Path:
    """Title, tighten, write the PNG and free the figure."""
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_forecast(signal: np.ndarray, forecast: np.ndarray, out_png: str | Path, title: str = "",
                  max_channels: int = 3) -> Path:
    """Each channel's signal and the one-step-ahead forecast streamed by the model."""
    signal, forecast = np.asarray(signal, np.float32), np.asarray(forecast, np.float32)
    if signal.ndim == 1:
        signal, forecast = signal[:, None], forecast.reshape(-1, 1)
    if signal.shape != forecast.shape:
        raise ShapeError(f"plot_forecast: signal {signal.shape} and forecast {forecast.shape} must match")
    plt = _pyplot()
    channels = min(signal.shape[1], max_channels)
    fig, axes = plt.subplots(channels, 1, figsize=(9, 2.2 * channels + 0.6), sharex=True, squeeze=False)
    t = np.arange(signal.shape[0])
    for ch in range(channels):
        ax = axes[ch][0]
        ax.plot(t, signal[:, ch], color="0.35", linewidth=1.0, label="signal")
        ax.plot(t[1:], forecast[:-1, ch], color="tab:orange", linewidth=1.0, label="streamed forecast (t+1)")
        ax.set_ylabel(f"channel {ch}")
    axes[0][0].legend(loc="upper right", fontsize=8)
    axes[-1][0].set_xlabel("step")
    return _save(plt, fig, title, out_png)


def plot_surprisal(surprisal_bits: np.ndarray, out_png: str | Path, title: str = "",
                   signal: np.ndarray | None = None, uniform_bits: float | None = None,
                   smooth: int = 25) -> Path:
    """Per-step surprisal -log2 p(x_t | x_<t) as streamed (and its running mean), optionally
    under the raw signal; ``uniform_bits`` draws the no-model baseline."""
    bits = np.asarray(surprisal_bits, np.float64).reshape(-1)
    plt = _pyplot()
    rows = 2 if signal is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows + 0.6), sharex=True, squeeze=False)
    t = np.arange(bits.size)
    if signal is not None:
        axes[0][0].plot(t, np.asarray(signal, np.float32).reshape(bits.size, -1)[:, 0], color="0.35", linewidth=0.8)
        axes[0][0].set_ylabel("signal")
    ax = axes[-1][0]
    ax.plot(t, bits, color="tab:blue", linewidth=0.5, alpha=0.45, label="surprisal per step")
    k = max(1, min(smooth, bits.size))
    ax.plot(t[k - 1:], np.convolve(bits, np.ones(k) / k, mode="valid"), color="tab:blue", linewidth=1.5,
            label=f"running mean ({k} steps)")
    if uniform_bits is not None:
        ax.axhline(uniform_bits, color="tab:red", linestyle="--", linewidth=1.0, label="no model (uniform)")
    ax.set_ylabel("bits")
    ax.set_xlabel("step")
    ax.legend(loc="upper right", fontsize=8)
    return _save(plt, fig, title, out_png)
