"""Training-curve PNGs from a CSVLogger ``metrics.csv`` (matplotlib, Agg backend, no display).

CSVLogger writes one row per logging call with a ``step`` column and one column per metric;
rows hold only the metrics logged at that moment. The loss panel shows train (per step) and
validation (per epoch) curves with their unit on the axis, in bits like the rest of streamssm:

- language models (``*/bpt`` logged): cross-entropy in bits per token;
- other cross-entropy losses (classifiers, ``*/acc`` logged): the nats of ``*/loss`` / ln 2 = bits;
- forecasters (``*/mse`` logged): the loss, named MSE or MAE (of the targets as trained);
- anything else: ``loss``, unit unknown.

A learning-rate panel follows when ``lr`` was logged. The default title names the run and the
task (``sensor_tiny · Forecaster (version_0)``) from the log directory and its ``config.yaml``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

from streamssm.errors import DataFormatError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = dict[str, list[tuple[int, float]]]


def read_metrics(metrics_csv: str | Path) -> Series:
    """Parse a CSVLogger metrics file into ``{column: [(step, value), ...]}`` (empty cells skipped)."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise DataFormatError(f"metrics file {str(path)!r} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise DataFormatError(f"{path}: expected a CSVLogger metrics file with a 'step' column, got {reader.fieldnames}")
        series: Series = {k: [] for k in reader.fieldnames if k not in ("step", "epoch")}
        for row in reader:
            step = int(float(row["step"]))
            for key in series:
                cell = row.get(key, "")
                if cell not in ("", None):
                    value = float(cell)
                    if math.isfinite(value):
                        series[key].append((step, value))
    return {k: v for k, v in series.items() if v}


def loss_curves(series: Series) -> tuple[Series, str]:
    """The curves of the loss panel and its y-axis label with the unit (see the module docstring)."""
    bpt = {k: v for k, v in series.items() if k.endswith("bpt")}
    if bpt:
        return bpt, "cross-entropy (bits per token)"
    losses = {k: v for k, v in series.items() if k.endswith("loss")}
    if any(k.endswith("/acc") for k in series):
        return {k: [(s, v / math.log(2.0)) for s, v in pts] for k, pts in losses.items()}, "cross-entropy (bits)"
    for kind, label in (("mse", "MSE"), ("mae", "MAE")):
        for key, points in losses.items():
            twin = series.get(key[: -len("loss")] + kind)
            if twin and dict(twin) == dict(points):
                return losses, f"{label} (training targets)"
    return losses, "loss (unit not recorded)"


def default_title(metrics_csv: str | Path) -> str:
    """``<run> · <Task> (<version>)`` from a CSVLogger directory ``<save_dir>/<run>/<version>/``."""
    log_dir = Path(metrics_csv).resolve().parent
    run, version = (log_dir.parent.name, log_dir.name) if log_dir.name.startswith("version_") else (log_dir.name, "")
    title = run
    config = log_dir / "config.yaml"
    if config.is_file():
        import yaml

        try:
            model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        except yaml.YAMLError:
            model = {}
        task = str(model.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(model, dict) else ""
        title += f" · {task}" if task else ""
    return f"{title} ({version})" if version else title


def training_curve_figure(metrics_csv: str | Path, title: str | None = None) -> Figure:
    """The figure of :func:`plot_training_curve` (caller closes it). Raises ``DataFormatError``
    when the file has no loss column with values."""
    from matplotlib.figure import Figure

    series = read_metrics(metrics_csv)
    losses, ylabel = loss_curves(series)
    if not losses:
        raise DataFormatError(f"{metrics_csv}: no loss column with values among {sorted(series)}")
    lr = series.get("lr")
    fig = Figure(figsize=(7, 5.5 if lr else 4))
    axes = fig.subplots(2 if lr else 1, 1, sharex=True, squeeze=False)
    ax = axes[0][0]
    for name, points in sorted(losses.items()):
        steps, values = zip(*points)
        style = "-" if len(points) > 20 else "-o"
        ax.plot(steps, values, style, label=name, markersize=3, linewidth=1.2)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or default_title(metrics_csv))
    if lr:
        steps, values = zip(*lr)
        axes[1][0].plot(steps, values, color="tab:gray", linewidth=1.0)
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def plot_training_curve(metrics_csv: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Draw the loss curves (and learning rate, if logged) of ``metrics_csv`` into ``out_png``."""
    fig = training_curve_figure(metrics_csv, title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
