"""Training-curve PNGs from a CSVLogger ``metrics.csv`` (matplotlib, Agg backend, no display).

CSVLogger writes one row per logging call with a ``step`` column and one column per metric;
rows hold only the metrics logged at that moment. Curves are drawn for every ``*loss`` column
(train per step, validation per epoch) on one axis, plus the learning rate on a second panel
when it was logged.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from streamssm.errors import DataFormatError


def read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Parse a CSVLogger metrics file into ``{column: [(step, value), ...]}`` (empty cells skipped)."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise DataFormatError(f"metrics file {str(path)!r} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise DataFormatError(f"{path}: expected a CSVLogger metrics file with a 'step' column, got {reader.fieldnames}")
        series: dict[str, list[tuple[int, float]]] = {k: [] for k in reader.fieldnames if k not in ("step", "epoch")}
        for row in reader:
            step = int(float(row["step"]))
            for key in series:
                cell = row.get(key, "")
                if cell not in ("", None):
                    value = float(cell)
                    if math.isfinite(value):
                        series[key].append((step, value))
    return {k: v for k, v in series.items() if v}


def plot_training_curve(metrics_csv: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Draw the loss curves (and learning rate, if logged) of ``metrics_csv`` into ``out_png``.

    Raises ``DataFormatError`` when the file has no loss column with values.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    losses = {k: v for k, v in series.items() if k.endswith("loss")}
    if not losses:
        raise DataFormatError(f"{metrics_csv}: no loss column with values among {sorted(series)}")
    lr = series.get("lr")
    fig, axes = plt.subplots(2 if lr else 1, 1, figsize=(7, 5.5 if lr else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    for name, points in sorted(losses.items()):
        steps, values = zip(*points)
        style = "-" if len(points) > 20 else "-o"
        ax.plot(steps, values, style, label=name, markersize=3, linewidth=1.2)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or Path(metrics_csv).parent.name)
    if lr:
        steps, values = zip(*lr)
        axes[1][0].plot(steps, values, color="tab:gray", linewidth=1.0)
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
