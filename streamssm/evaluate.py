"""Evaluation: classifiers (early classification, per-class report, confusion matrix) and the
long-horizon forecasting protocol.

A streaming classifier has an answer after every step: the class probabilities of the running
decision (``pool="last"``: the softmax of the step's logits, what the service returns per chunk;
``pool="mean"``: the softmax of the mean of the logits so far). ``early_classification_curve``
reads that answer after a fraction of each series and reports accuracy per fraction, as a table
and a PNG. Series are model inputs (already normalized, e.g. ``serving_spec().encoder()`` of raw
rows), of any length; each goes through the model once, offline (equal to streaming it).

``ClassificationReport`` (accuracy, per-class precision/recall/F1, confusion matrix PNG) is what
``ReportCallback`` writes after ``streamssm test`` of a ``SequenceClassifier``
(``--trainer.callbacks+=streamssm.evaluate.ReportCallback``).

Forecasting protocol (``forecast_protocol``, ``ForecastCallback`` after ``streamssm test`` of a
``Forecaster``), as the long-horizon literature reports it (Informer, Autoformer, PatchTST):
data standardized with the training rows' mean/std (the datamodule's ``normalize``); for every
forecast origin t of the test rows (``stride`` apart, 1 in the papers) the model reads the
``lookback`` rows before t (they may lie before the test span, in the same series, as in the
papers' loaders) and forecasts the next T rows, T in ``horizons`` (96/192/336/720); MSE and
MAE are means over origins, steps and channels, in standardized units. How the T values come:

- ``direct``: the ``Forecaster``'s head predicts ``horizon`` >= T values at every step; the
  forecast is the one read at the last look-back row.
- ``rollout`` (iterated multi-step): after the look-back, the model's ``horizon`` predicted
  rows are fed back as the next inputs (chunked forward, state carried) and the next block is
  read at their last row, until T rows exist; needs every channel forecast (no
  ``target_columns``). ``auto`` picks ``direct`` when the head's horizon covers the longest T.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

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


@dataclass(frozen=True)
class ForecastReport:
    """MSE/MAE (standardized units) per horizon of the forecasting protocol.

    ``example`` holds one origin's channel-0 look-back (lookback,), truth and forecast
    (longest horizon,) for the plot."""

    lookback: int
    method: str
    horizons: tuple[int, ...]
    mse: tuple[float, ...]
    mae: tuple[float, ...]
    origins: tuple[int, ...]
    example: dict[str, list[float]]

    def table(self) -> str:
        """One row per horizon: horizon, MSE, MAE, number of forecast origins."""
        head = f"look-back {self.lookback}, {self.method}\n{'horizon':>8}  {'mse':>8}  {'mae':>8}  {'origins':>8}"
        rows = [f"{h:>8}  {e:8.4f}  {a:8.4f}  {n:>8}"
                for h, e, a, n in zip(self.horizons, self.mse, self.mae, self.origins, strict=True)]
        return "\n".join([head, *rows])

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """``forecast.json`` (every field) and ``forecast.png`` (the example forecast and the
        errors per horizon) under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "forecast.json").write_text(json.dumps(asdict(self), indent=1) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        past, truth, pred = (np.asarray(self.example[k]) for k in ("lookback", "truth", "forecast"))
        left.plot(np.arange(-len(past), 0), past, color="0.4", label="look-back")
        left.plot(np.arange(len(truth)), truth, color="C0", label="truth")
        left.plot(np.arange(len(pred)), pred, color="C1", label=f"forecast ({self.method})")
        left.set_xlabel("steps from the forecast origin")
        left.set_title("channel 0, first origin (standardized)")
        left.legend(fontsize=8)
        right.plot(self.horizons, self.mse, marker="o", label="MSE")
        right.plot(self.horizons, self.mae, marker="o", label="MAE")
        right.set_xlabel("horizon")
        right.set_title(f"errors per horizon (look-back {self.lookback})")
        right.legend(fontsize=8)
        _save(fig, plt, out / "forecast.png")
        return out / "forecast.json", out / "forecast.png"


def forecast(model: nn.Module, context: torch.Tensor, steps: int, horizon: int, method: str) -> torch.Tensor:
    """Forecast ``steps`` rows after each look-back ``context`` (b, L, c) -> (b, steps, k).

    ``model`` maps (b, l, c) inputs and a state to outputs (b, l, horizon * k) and the state
    (an ``SSMModel`` of a ``Forecaster``); ``method`` is ``direct`` or ``rollout`` (module doc).
    """
    b = context.shape[0]
    with torch.no_grad():
        y, state = model(context)
        block = y[:, -1].float().view(b, horizon, -1)  # (b, h, k)
        if method == "direct":
            if horizon < steps:
                raise ConfigError(f"direct forecasts need the head's horizon ({horizon}) >= {steps} steps; "
                                  f"use method='rollout' or train with horizon {steps}")
            return block[:, :steps]
        if block.shape[-1] != context.shape[-1]:
            raise ConfigError(f"rollout feeds forecasts back as inputs: the model forecasts {block.shape[-1]} of "
                              f"{context.shape[-1]} input channels; forecast every channel or use method='direct'")
        out = [block]
        while sum(o.shape[1] for o in out) < steps:
            y, state = model(block.to(context.dtype), state)
            block = y[:, -1].float().view(b, horizon, -1)
            out.append(block)
        return torch.cat(out, 1)[:, :steps]


def forecast_origins(
    spans: Sequence[tuple[int, int]], starts: Sequence[int], lookback: int, horizon: int, stride: int
) -> list[tuple[int, int]]:
    """``(origin, end of its span)`` of every forecast origin t: ``[t - lookback, t)`` inside the
    series (starting at ``starts[i]``) and ``[t, t + horizon)`` inside the span ``spans[i]``."""
    out = []
    for (lo, hi), first in zip(spans, starts, strict=True):
        out += [(t, hi) for t in range(max(lo, first + lookback), hi - horizon + 1, stride)]
    return out


def forecast_protocol(
    model: nn.Module,
    values: np.ndarray,
    spans: Sequence[tuple[int, int]],
    starts: Sequence[int],
    model_horizon: int,
    lookback: int = 96,
    horizons: Sequence[int] = (96, 192, 336, 720),
    stride: int = 1,
    method: str = "auto",
    target_index: Sequence[int] | None = None,
    batch_size: int = 64,
) -> ForecastReport:
    """MSE/MAE per horizon over the test ``spans`` of standardized ``values`` (rows, c).

    ``starts[i]`` is the first row of the series holding ``spans[i]`` (look-backs may reach back
    to it); ``target_index`` lists the forecast channels (None: all). Every origin with room for
    the shortest horizon is forecast once, to the longest horizon (or its span's end): the
    first T rows of a forecast are the T-row forecast (the model is causal)."""
    horizons = tuple(sorted(int(h) for h in horizons))
    if not horizons or horizons[0] < 1 or lookback < 1 or stride < 1:
        raise ConfigError(f"need lookback, stride and horizons >= 1, got {lookback}, {stride}, {list(horizons)}")
    if method == "auto":
        method = "direct" if model_horizon >= horizons[-1] else "rollout"
    if method not in ("direct", "rollout"):
        raise ConfigError(f"method must be 'auto', 'direct' or 'rollout', got {method!r}")
    origins = forecast_origins(spans, starts, lookback, horizons[0], stride)
    if not origins:
        longest = max((hi - lo for lo, hi in spans), default=0)
        raise ConfigError(f"no forecast origin: the test spans (longest {longest} rows) cannot hold a "
                          f"{horizons[0]}-row horizon after a {lookback}-row look-back")
    targets = list(target_index) if target_index is not None else list(range(values.shape[1]))
    sq = np.zeros(len(horizons))
    ab = np.zeros(len(horizons))
    counts = np.zeros(len(horizons), dtype=np.int64)
    device = next(model.parameters()).device
    example: dict[str, list[float]] = {}
    for i in range(0, len(origins), batch_size):
        batch = origins[i:i + batch_size]
        context = torch.from_numpy(np.stack([values[t - lookback:t] for t, _ in batch])).to(device)  # (b, L, c)
        pred = forecast(model, context, horizons[-1], model_horizon, method).cpu().numpy()  # (b, T, k)
        for row, (t, end) in enumerate(batch):
            truth = values[t:min(t + horizons[-1], end), targets]  # (<= T, k)
            err = pred[row, :len(truth)] - truth
            if not example:
                example = {"lookback": values[t - lookback:t, targets[0]].tolist(), "truth": truth[:, 0].tolist(),
                           "forecast": pred[row, :, 0].tolist()}
            for j, h in enumerate(horizons):
                if len(truth) >= h:
                    sq[j] += float(np.mean(err[:h] ** 2))
                    ab[j] += float(np.mean(np.abs(err[:h])))
                    counts[j] += 1
    mse = tuple(float(v) for v in sq / np.maximum(counts, 1))
    mae = tuple(float(v) for v in ab / np.maximum(counts, 1))
    return ForecastReport(lookback, method, horizons, mse, mae, tuple(int(c) for c in counts), example)


class ForecastCallback(pl.Callback):
    """After testing a ``Forecaster`` on a ``SensorDataModule``: runs :func:`forecast_protocol` on
    the test rows (the time split or ``test_path``), logs the table and writes ``forecast.json``
    and ``forecast.png`` under ``out_dir`` (default: the trainer's log dir).

    Args:
        lookback: rows the model reads before each forecast origin.
        horizons: forecast lengths to score (the literature's 96/192/336/720 by default).
        stride: rows between forecast origins (1: every origin, as the papers do).
        method: ``auto``, ``direct`` or ``rollout`` (module docstring).
        batch_size: origins forecast together.
        out_dir: where the files go.
    """

    def __init__(self, lookback: int = 96, horizons: list[int] = [96, 192, 336, 720], stride: int = 1,  # noqa: B006
                 method: str = "auto", batch_size: int = 64, out_dir: str | None = None) -> None:
        self.lookback, self.horizons, self.stride = int(lookback), list(horizons), int(stride)
        self.method, self.batch_size, self.out_dir = method, int(batch_size), out_dir
        self.report: ForecastReport | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if not hasattr(pl_module, "horizon") or getattr(dm, "task", None) != "forecast":
            raise ConfigError("ForecastCallback scores a Forecaster on a SensorDataModule with task='forecast'")
        spans = dm.split_rows["test"]
        starts = [next((a for a, b in dm.series_bounds if a <= lo < b), lo) for lo, _ in spans]
        model = pl_module.model.eval()
        self.report = forecast_protocol(model, dm.values, spans, starts, pl_module.horizon, self.lookback,
                                        self.horizons, self.stride, self.method, dm.target_index, self.batch_size)
        out = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)
        files = self.report.write(out)
        log.info("forecast protocol on the test rows (%s, %s):\n%s", *files, self.report.table())


__all__ = [
    "ClassificationReport", "EarlyCurve", "ForecastCallback", "ForecastReport", "ReportCallback",
    "early_classification_curve", "forecast", "forecast_origins", "forecast_protocol", "running_probabilities",
]
