"""Evaluation of sequence classifiers on whole labeled series: early classification.

A streaming classifier has an answer after every step: the class probabilities of the running
decision (``pool="last"``: the softmax of the step's logits, what the service returns per chunk;
``pool="mean"``: the softmax of the mean of the logits so far). ``early_classification_curve``
reads that answer after a fraction of each series and reports accuracy per fraction, as a table
and a PNG. Series are model inputs (already normalized, e.g. ``serving_spec().encoder()`` of raw
rows), of any length; each goes through the model once, offline (equal to streaming it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamssm.errors import ConfigError, ShapeError

Model = Callable[[torch.Tensor], torch.Tensor]  # inputs (1, l, c) -> logits (1, l, k)


def running_probabilities(model: Model, series: np.ndarray | torch.Tensor, pool: str = "last") -> np.ndarray:
    """Class probabilities (l, k) of the running decision after each step of one series (l, c)."""
    x = torch.as_tensor(np.asarray(series, dtype=np.float32))
    if x.dim() != 2 or x.shape[0] == 0:
        raise ShapeError(f"a series must be a non-empty (length, channels) array, got shape {tuple(x.shape)}")
    with torch.no_grad():
        logits = model(x[None]).float()[0]  # (l, k)
    if pool == "mean":
        logits = logits.cumsum(0) / torch.arange(1, len(logits) + 1, dtype=logits.dtype)[:, None]
    elif pool != "last":
        raise ConfigError(f"pool must be 'last' or 'mean', got {pool!r}")
    return torch.softmax(logits, -1).numpy()


@dataclass(frozen=True)
class EarlyCurve:
    """Accuracy (f,) after each fraction (f,) of every series was seen, over ``n_series``."""

    fractions: np.ndarray
    accuracy: np.ndarray
    n_series: int

    def table(self) -> str:
        """Two aligned columns, one row per fraction."""
        rows = [f"{f:>8.0%}  {a:8.4f}" for f, a in zip(self.fractions, self.accuracy, strict=True)]
        return "\n".join([f"{'seen':>8}  {'accuracy':>8}", *rows])

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the curve as a PNG (matplotlib, Agg backend) and return its path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(100 * self.fractions, self.accuracy, marker="o", markersize=3)
        ax.set_xlabel("share of each series seen (%)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(title or f"early classification ({self.n_series} series)")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def early_classification_curve(
    model: Model,
    series: Sequence[np.ndarray | torch.Tensor],
    labels: Sequence[int],
    fractions: Sequence[float] | None = None,
    pool: str | None = None,
) -> EarlyCurve:
    """Accuracy of the running decision after ``fractions`` of each series (default 5%, 10%, .. 100%).

    After a fraction f of a series of l steps the decision is the one at step ``ceil(f*l)``
    (at least the first). ``model`` maps (1, l, c) inputs to (1, l, k) logits (a
    ``SequenceClassifier`` in eval mode); ``pool`` defaults to the model's ``pool`` (else "last").
    ``labels`` are class ids (indices into the logits).
    """
    if len(series) != len(labels) or not series:
        raise ConfigError(f"need one label per series and at least one series, got {len(series)} and {len(labels)}")
    grid = np.arange(1, 21) / 20 if fractions is None else np.asarray(fractions, dtype=np.float64)
    if grid.ndim != 1 or not grid.size or (grid <= 0).any() or (grid > 1).any():
        raise ConfigError(f"fractions must be in (0, 1], got {list(grid)}")
    pool = pool or getattr(model, "pool", "last")
    right = np.zeros(len(grid))
    for x, y in zip(series, labels, strict=True):
        probs = running_probabilities(model, x, pool)  # (l, k)
        steps = np.maximum(np.ceil(grid * len(probs) - 1e-9).astype(np.int64), 1) - 1
        right += probs[steps].argmax(-1) == int(y)
    return EarlyCurve(grid, right / len(series), len(series))


__all__ = ["EarlyCurve", "early_classification_curve", "running_probabilities"]
