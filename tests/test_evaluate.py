"""Early classification: running decisions read after a share of each series."""

import math

import numpy as np
import pytest
import torch

from streamssm.errors import ConfigError
from streamssm.evaluate import ClassificationReport, ReportCallback, early_classification_curve, running_probabilities
from streamssm.models import ArchConfig
from streamssm.tasks import SequenceClassifier


def running_sum(inputs: torch.Tensor) -> torch.Tensor:
    """(1, l, c) -> (1, l, 2) logits [s, -s], s the running sum of channel 0: class 0 when positive."""
    s = inputs[..., 0].cumsum(-1)
    return torch.stack([s, -s], -1)


def needs_the_whole_series(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Unequal-length series: noise, then a drift of +-1 per step over the last fifth, which
    decides the sign of the total (the label: 0 positive, 1 negative)."""
    rng = np.random.default_rng(seed)
    series, labels = [], []
    for i in range(n):
        length = int(rng.integers(60, 140))
        x = rng.normal(0.0, 1.0, (length, 2))
        tail = length // 5
        x[-tail:, 0] += 1.0 if i % 2 == 0 else -1.0
        series.append(x)
        labels.append(0 if x[:, 0].sum() > 0 else 1)
    return series, labels


def test_curve_rises_to_the_full_series_answer(tmp_path):
    series, labels = needs_the_whole_series(300)
    curve = early_classification_curve(running_sum, series, labels)
    assert curve.fractions[0] == pytest.approx(0.05) and curve.fractions[-1] == 1.0 and curve.n_series == 300
    assert curve.accuracy[-1] == 1.0  # the running sum at the last step is the label by construction
    assert curve.accuracy[curve.fractions <= 0.5].max() < 0.75  # the first half says little
    assert (np.diff(curve.accuracy[curve.fractions >= 0.8]) >= 0).all()
    # by hand at 50%: the sign of the sum of the first ceil(l/2) steps
    half = np.mean([(x[: math.ceil(len(x) / 2), 0].sum() <= 0) == y for x, y in zip(series, labels, strict=True)])
    assert curve.accuracy[9] == pytest.approx(half)
    lines = curve.table().splitlines()
    assert lines[0].split() == ["seen", "accuracy"] and lines[-1].split() == ["100%", "1.0000"]
    png = curve.plot(tmp_path / "early.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_full_series_decision_is_the_classifiers_pooled_decision(pool):
    torch.manual_seed(0)
    task = SequenceClassifier(pool=pool, arch=ArchConfig(d_model=16, n_layers=1, headdim=8, d_state=8, chunk_size=8),
                              input_kind="continuous", input_dim=2, output_dim=3).eval()
    task.configure_model()
    series, _ = needs_the_whole_series(6, seed=1)
    with torch.no_grad():
        pooled = [task.pooled_logits(task(torch.tensor(x, dtype=torch.float32)[None]), None)[0] for x in series]
    probs = [running_probabilities(task, x, pool)[-1] for x in series]
    for p, logits in zip(probs, pooled, strict=True):
        assert np.allclose(p, torch.softmax(logits, -1).numpy(), atol=1e-5)
    labels = [int(lg.argmax()) for lg in pooled]
    assert early_classification_curve(task, series, labels, fractions=[1.0]).accuracy.tolist() == [1.0]


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="one label per series"):
        early_classification_curve(running_sum, [np.zeros((3, 1))], [0, 1])
    with pytest.raises(ConfigError, match=r"fractions must be in \(0, 1\]"):
        early_classification_curve(running_sum, [np.zeros((3, 1))], [0], fractions=[0.0, 0.5])


def test_classification_report_by_hand(tmp_path):
    report = ClassificationReport.of([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert report.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    lines = report.text().splitlines()
    # class a: precision 2/2, recall 2/3, f1 0.8; b: 1/2, 1/2, 0.5; c: 1/2, 1/1, 2/3
    assert lines[1].split() == ["a", "1.0000", "0.6667", "0.8000", "3"]
    assert lines[2].split() == ["b", "0.5000", "0.5000", "0.5000", "2"]
    assert lines[3].split() == ["c", "0.5000", "1.0000", "0.6667", "1"]
    assert lines[4].split()[:2] == ["accuracy", "0.6667"] and report.accuracy == pytest.approx(4 / 6)
    assert report.plot_confusion(tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_report_callback_matches_the_test_accuracy(tmp_path):
    from lightning.pytorch import Trainer
    from test_datamodule_sensor import labeled, write_labeled_series

    train = write_labeled_series(tmp_path / "train.csv", [30] * 4)
    test = write_labeled_series(tmp_path / "test.csv", [30, 12, 45, 7, 20, 30], seed=5)
    dm = labeled(train, window=16, test_path=str(test), val_fraction=0.0, test_fraction=0.0)
    torch.manual_seed(1)
    task = SequenceClassifier(arch=ArchConfig(d_model=16, n_layers=1, headdim=8, d_state=8, chunk_size=8),
                              input_kind="continuous", input_dim=2, output_dim=2)
    callback = ReportCallback(out_dir=str(tmp_path / "report"))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[callback])
    acc = trainer.test(task, datamodule=dm, verbose=False)[0]["test/acc"]
    assert callback.report.classes == ("neg", "pos") and callback.report.confusion.sum() == len(dm._dataset("test"))
    assert callback.report.accuracy == pytest.approx(acc, abs=1e-6)
    assert (tmp_path / "report" / "report.txt").read_text() == callback.report.text() + "\n"
    assert (tmp_path / "report" / "confusion.png").exists()


# ------------------------------------------------------------------ forecasting protocol
def _forecaster(horizon: int, targets: int = 2):
    from streamssm.tasks import Forecaster

    torch.manual_seed(0)
    task = Forecaster(horizon=horizon, arch=ArchConfig(d_model=16, n_layers=1, headdim=8, d_state=8, chunk_size=8))
    return task, task.build_model({"input_kind": "continuous", "input_dim": 2, "output_dim": targets}).eval()


def _by_hand(model, values, origins, lookback, horizons, horizon, method):
    """The protocol written out: each forecast recomputed from scratch by full forwards over the
    growing sequence (no carried state), errors averaged per origin with plain loops."""
    sums = {h: [0.0, 0.0, 0] for h in horizons}
    for t, end in origins:
        seq = torch.from_numpy(values[t - lookback:t])
        preds: list[np.ndarray] = []
        while len(preds) < max(horizons):
            with torch.no_grad():
                y = model(seq[None])[0][0, -1].view(horizon, -1).numpy()  # (h, k)
            preds += list(y)
            if method == "direct":
                break
            seq = torch.cat([seq, torch.from_numpy(y)])
        for h in horizons:
            if t + h <= end:
                err = np.stack(preds[:h]) - values[t:t + h]
                sums[h][0] += float((err ** 2).mean())
                sums[h][1] += float(np.abs(err).mean())
                sums[h][2] += 1
    return {h: (s / n, a / n, n) for h, (s, a, n) in sums.items()}


@pytest.mark.parametrize("horizon, method", [(1, "rollout"), (3, "rollout"), (7, "direct")])
def test_forecast_protocol_equals_a_hand_computation(horizon, method, tmp_path):
    from streamssm.evaluate import forecast_origins, forecast_protocol

    rng = np.random.default_rng(0)
    values = rng.normal(size=(70, 2)).cumsum(0).astype(np.float32) / 5  # (rows, c), two series
    spans, starts = [(20, 40), (55, 70)], [0, 45]  # test rows of series [0, 40) and [45, 70)
    lookback, horizons = 8, (7, 4)
    _, model = _forecaster(horizon)
    report = forecast_protocol(model, values, spans, starts, horizon, lookback, horizons, stride=2, method="auto",
                               batch_size=3)
    assert report.method == method and report.horizons == (4, 7)
    origins = forecast_origins(spans, starts, lookback, 4, 2)
    # every origin has its look-back inside its series and at least the shortest horizon inside the span
    assert origins == [(t, 40) for t in range(20, 37, 2)] + [(t, 70) for t in range(55, 67, 2)]
    expected = _by_hand(model, values, origins, lookback, (4, 7), horizon, method)
    for j, h in enumerate((4, 7)):
        mse, mae, n = expected[h]
        assert report.origins[j] == n
        assert report.mse[j] == pytest.approx(mse, rel=1e-4) and report.mae[j] == pytest.approx(mae, rel=1e-4)
    json_path, png = report.write(tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG" and '"mse"' in json_path.read_text()
    assert report.table().splitlines()[2].split()[0] == "4"


def test_forecast_protocol_refusals():
    from streamssm.evaluate import forecast_protocol

    values = np.zeros((30, 2), np.float32)
    _, model = _forecaster(2)
    with pytest.raises(ConfigError, match="direct forecasts need the head's horizon"):
        forecast_protocol(model, values, [(10, 30)], [0], 2, 4, (5,), method="direct")
    with pytest.raises(ConfigError, match="no forecast origin"):
        forecast_protocol(model, values, [(10, 30)], [10], 2, 16, (8,))
    _, one_channel = _forecaster(2, targets=1)
    with pytest.raises(ConfigError, match="forecasts 1 of 2 input channels"):
        forecast_protocol(one_channel, values, [(10, 30)], [0], 2, 4, (5,), method="rollout", target_index=[1])


def test_forecast_callback_scores_the_test_rows_after_streamssm_test(tmp_path):
    """ForecastCallback after Trainer.test: the protocol over the datamodule's test span, its
    look-backs reaching back into the rows before it (same series), files written."""
    import lightning.pytorch as pl

    from streamssm.datamodules import SensorDataModule, synthetic
    from streamssm.evaluate import ForecastCallback, forecast_protocol

    path = synthetic.write_sensor_table(tmp_path / "s.csv", rows=200, channels=2, seed=0)
    dm = SensorDataModule(str(path), time_column="timestamp", window=16, val_fraction=0.0, test_fraction=0.2,
                          batch_size=4)
    task, model = _forecaster(2)
    callback = ForecastCallback(lookback=50, horizons=[6, 3], stride=5, out_dir=str(tmp_path / "out"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.test(task, datamodule=dm, verbose=False)
    assert dm.split_rows["test"] == [(160, 200)]  # a 40-row test span: 50-row look-backs start in training rows
    expected = forecast_protocol(model, dm.values, [(160, 200)], [0], 2, 50, (3, 6), stride=5)
    assert callback.report == expected and expected.method == "rollout" and expected.origins == (8, 7)
    assert (tmp_path / "out" / "forecast.json").is_file() and (tmp_path / "out" / "forecast.png").is_file()
