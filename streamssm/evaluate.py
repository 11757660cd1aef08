"""Evaluation of sequence classifiers: early classification, per-class report, confusion matrix.

A streaming classifier has an answer after every step: the class probabilities of the running
decision (``pool="last"``: the softmax of the step's logits, what the service returns per chunk;
``pool="mean"``: the softmax of the mean of the logits so far). ``early_classification_curve``
reads that answer after a fraction of each series and reports accuracy per fraction, as a table
and a PNG. Series are model inputs (already normalized, e.g. ``serving_spec().encoder()`` of raw
rows), of any length; each goes through the model once, offline (equal to streaming it).

``ClassificationReport`` (accuracy, per-class precision/recall/F1, confusion matrix PNG) is what
``ReportCallback`` writes after ``streamssm test`` of a ``SequenceClassifier``
(``--trainer.callbacks+=streamssm.evaluate.ReportCallback``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from streamssm.errors import ConfigError, ShapeError

log = logging.getLogger(__name__)

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
        fig, ax, plt = _axes((5, 3.5))
        ax.plot(100 * self.fractions, self.accuracy, marker="o", markersize=3)
        ax.set_xlabel("share of each series seen (%)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(title or f"early classification ({self.n_series} series)")
        return _save(fig, plt, path)


def _axes(size: tuple[float, float]) -> tuple[Any, Any, Any]:
    """(figure, axes, pyplot) with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    return fig, ax, plt


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
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


@dataclass(frozen=True)
class ClassificationReport:
    """``confusion[i, j]``: how many samples of true class i were predicted j (k, k)."""

    classes: tuple[str, ...]
    confusion: np.ndarray

    @classmethod
    def of(cls, true: Sequence[int], pred: Sequence[int], classes: Sequence[object]) -> ClassificationReport:
        k = len(classes)
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
        return cls(tuple(str(c) for c in classes), confusion)

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.confusion.sum(), 1))

    def text(self) -> str:
        """Per-class precision, recall, F1 and support, then accuracy over all samples."""
        c = self.confusion
        hit, predicted, support = np.diag(c), c.sum(0), c.sum(1)
        precision = np.divide(hit, predicted, out=np.zeros(len(hit)), where=predicted > 0)
        recall = np.divide(hit, support, out=np.zeros(len(hit)), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(hit)),
                       where=precision + recall > 0)
        width = max([len(n) for n in self.classes] + [8])
        lines = [f"{'class':<{width}}  precision  recall      f1  support"]
        for i, name in enumerate(self.classes):
            lines.append(f"{name:<{width}}  {precision[i]:9.4f}  {recall[i]:6.4f}  {f1[i]:6.4f}  {support[i]:7d}")
        lines.append(f"{'accuracy':<{width}}  {self.accuracy:9.4f}  ({int(hit.sum())} of {int(c.sum())})")
        return "\n".join(lines)

    def plot_confusion(self, path: str | Path) -> Path:
        """Confusion matrix PNG (rows: true class, columns: predicted), counts in the cells."""
        k = len(self.classes)
        fig, ax, plt = _axes((1.5 + 0.6 * k, 1.2 + 0.6 * k))
        ax.imshow(self.confusion, cmap="Blues")
        ax.set_xticks(range(k), self.classes, rotation=45, ha="right")
        ax.set_yticks(range(k), self.classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = self.confusion.max()
        for i in range(k):
            for j in range(k):
                v = self.confusion[i, j]
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_title(f"accuracy {self.accuracy:.4f}")
        return _save(fig, plt, path)


class ReportCallback(pl.Callback):
    """After testing a ``SequenceClassifier``: writes ``report.txt`` and ``confusion.png`` (its
    decisions on the test windows, pooled as it was trained) under ``out_dir`` (default: the
    trainer's log dir) and logs the report. Class names come from the datamodule's ``classes``."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self._true: list[torch.Tensor] = []
        self._pred: list[torch.Tensor] = []
        self._k = 0
        self.report: ClassificationReport | None = None

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._true, self._pred = [], []

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not hasattr(pl_module, "pooled_logits"):
            raise ConfigError(f"ReportCallback reports classifiers, got {type(pl_module).__name__}")
        with torch.no_grad():
            logits = pl_module.pooled_logits(pl_module(batch["inputs"]).float(), batch.get("mask"))  # (b, k)
        self._true.append(batch["targets"].detach().cpu())
        self._pred.append(logits.argmax(-1).cpu())
        self._k = logits.shape[-1]

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._true:
            return
        classes = list(getattr(trainer.datamodule, "classes", None) or range(self._k))
        self.report = ClassificationReport.of(torch.cat(self._true).tolist(), torch.cat(self._pred).tolist(), classes)
        out = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(self.report.text() + "\n")
        self.report.plot_confusion(out / "confusion.png")
        log.info("test classification report (%s):\n%s", out, self.report.text())


__all__ = [
    "ClassificationReport", "EarlyCurve", "ReportCallback", "early_classification_curve", "running_probabilities",
]
