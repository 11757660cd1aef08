"""SensorDataModule on tiny generated tables: windows, splits, normalization, sorting, errors."""

import numpy as np
import polars as pl
import pytest
import torch

from streamssm.datamodules import SensorDataModule, synthetic
from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ModelConfig

FEATURES = ["ch0", "ch1", "ch2"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sensor")
    csv = synthetic.write_sensor_table(folder / "s.csv", rows=600, channels=3, seed=0, label=True)
    return csv, pl.read_csv(csv)


def make(path, **kw):
    kw.setdefault("window", 32)
    kw.setdefault("batch_size", 8)
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("test_fraction", 0.1)
    dm = SensorDataModule(str(path), **kw)
    dm.setup("fit")
    return dm


def test_forecast_windows_are_normalized_rows_shifted_by_one(table):
    path, df = table
    dm = make(path, time_column="timestamp", stride=16)
    raw = df.select(FEATURES).to_numpy().astype(np.float64)
    train = raw[:420]  # 600 rows: train [0, 420), val [420, 540), test [540, 600)
    mean, std = train.mean(0), train.std(0)
    assert np.allclose(dm.normalizer.mean.numpy(), mean) and np.allclose(dm.normalizer.std.numpy(), std)
    assert not np.allclose(raw.mean(0), mean, atol=1e-3)  # full-table stats would differ: train only
    ds = dm._dataset("train")
    assert ds.starts == list(range(0, 420 - 33 + 1, 16))
    sample = ds[3]
    expected = torch.tensor((raw[48:81] - mean) / std, dtype=torch.float32)
    assert torch.allclose(sample["inputs"], expected[:-1], atol=1e-5)
    assert torch.allclose(sample["targets"], expected[1:], atol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (8, 32, 3) and batch["targets"].shape == (8, 32, 3)
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert dm.model_io() == {"input_kind": "continuous", "input_dim": 3, "head": "regression", "output_dim": 3}
    spec = dm.serving_spec()
    assert list(spec.channel_names) == FEATURES and spec.classes == ()
    served = spec.encoder()(raw[48:80].astype(np.float32))
    assert torch.allclose(served, sample["inputs"], atol=1e-5)


@pytest.mark.parametrize("cuda", [False, True])
def test_pin_memory_only_where_a_gpu_can_use_it(table, monkeypatch, cuda):
    """The full recipes ask for pinned memory (sized for a GPU); on a CPU-only host the loaders
    do not pin, or torch warns 'no accelerator is found' for every loader of a CPU run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dm = make(table[0], pin_memory=True)
    assert dm.train_dataloader().pin_memory is cuda and dm.val_dataloader().pin_memory is cuda
    assert make(table[0], pin_memory=False).train_dataloader().pin_memory is False


def test_splits_by_time_do_not_leak(table):
    path, _ = table
    dm = make(path, stride=8)
    for split, lo, hi in (("train", 0, 420), ("val", 420, 540), ("test", 540, 600)):
        starts = dm._dataset(split).starts
        assert starts and all(lo <= s and s + 33 <= hi for s in starts)
    loader = dm.train_dataloader()  # Lightning iterates one loader per epoch, calling set_epoch first
    orders = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        orders.append([tuple(row) for b in loader for row in b["inputs"][:, 0].tolist()])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]  # reshuffled each epoch


def test_timestamp_sort_restores_order(tmp_path, table):
    path, _ = table
    shuffled = synthetic.write_sensor_table(tmp_path / "shuf.parquet", rows=600, channels=3, seed=0, label=True,
                                            format="parquet", shuffle_rows=True)  # fmt: skip
    a = make(path, time_column="timestamp")
    b = make(shuffled, time_column="timestamp")
    assert np.allclose(a.values, b.values, atol=1e-5)
    unsorted = make(shuffled)
    assert not np.allclose(a.values, unsorted.values, atol=1e-3)


def test_classification_labels_last_row_of_window(table):
    path, df = table
    dm = make(path, task="classification", label_column="label", time_column="timestamp", stride=20)
    assert dm.classes == ["regime_0", "regime_1", "regime_2"]
    assert dm.model_io() == {"input_kind": "continuous", "input_dim": 3, "head": "classifier", "output_dim": 3}
    ModelConfig(**dm.model_io())
    labels = df["label"].to_list()
    ds = dm._dataset("train")
    for i in range(len(ds)):
        s = ds.starts[i]
        sample = ds[i]
        assert sample["inputs"].shape == (32, 3)
        assert dm.classes[int(sample["targets"])] == labels[s + 31]
    batch = next(iter(dm.train_dataloader()))
    assert batch["targets"].shape == (8,) and batch["targets"].dtype == torch.long
    assert dm.serving_spec().classes == ("regime_0", "regime_1", "regime_2")
    with pytest.raises(ConfigError, match="label_column"):
        SensorDataModule(str(path), task="classification")


def test_long_format_series_and_multiple_files(tmp_path):
    long = synthetic.write_sensor_table(
        tmp_path / "long.csv", rows=200, channels=2, seed=1, n_series=3, shuffle_rows=True
    )
    dm = make(long, series_column="series_id", time_column="timestamp", window=16, stride=4)
    assert dm.series_bounds == [(0, 200), (200, 400), (400, 600)]
    for split in ("train", "val", "test"):
        for s in dm._dataset(split).starts:
            end = s + 17
            assert any(lo <= s and end <= hi for lo, hi in dm.split_rows[split])
    assert dm.split_rows["val"] == [(140, 180), (340, 380), (540, 580)]
    for k in range(2):
        synthetic.write_sensor_table(
            tmp_path / "many" / f"part{k}.parquet", rows=100, channels=2, seed=k, format="parquet"
        )
    multi = make(tmp_path / "many", time_column="timestamp", window=16, val_fraction=0.2, test_fraction=0.0)
    assert multi.series_bounds == [(0, 100), (100, 200)]
    assert multi.feature_names == ["ch0", "ch1"]


def test_missing_values_error_or_fill(tmp_path):
    path = synthetic.write_sensor_table(tmp_path / "holes.parquet", rows=300, channels=2, seed=2, format="parquet",
                                        missing_fraction=0.05)  # fmt: skip
    with pytest.raises(DataFormatError, match=r"missing values.*'ch0'.*missing='fill'"):
        make(path)
    dm = make(path, missing="fill", normalize=False)
    assert np.isfinite(dm.values).all()
    raw = pl.read_parquet(path)["ch0"].to_numpy()
    idx = np.arange(len(raw))
    ok = ~np.isnan(raw)
    interior = (idx > idx[ok][0]) & (idx < idx[ok][-1])
    expected = np.interp(idx, idx[ok], raw[ok])
    assert np.allclose(dm.values[interior, 0], expected[interior], atol=1e-4)
    nan_csv = tmp_path / "nan.csv"
    nan_csv.write_text("a,b\n" + "\n".join(f"{i},{'NaN' if i == 7 else i * 2}" for i in range(50)) + "\n")
    with pytest.raises(DataFormatError, match=r"'b'.*data row \{'b': 8\} \(1-based"):
        make(nan_csv, window=8)


def test_clear_errors_for_columns_and_files(tmp_path, table):
    path, _ = table
    with pytest.raises(DataFormatError, match=r"'pressure'.*available columns"):
        make(path, columns=["ch0", "pressure"])
    with pytest.raises(DataFormatError, match="time_column 'time'"):
        make(path, time_column="time")
    with pytest.raises(DataFormatError, match=r"numeric.*'label'"):
        make(path, columns=["ch0", "label"])
    only = make(path, columns=["ch2", "ch0"])
    assert only.feature_names == ["ch2", "ch0"] and only.model_io()["input_dim"] == 2
    with pytest.raises(DataFormatError, match="does not exist"):
        make(tmp_path / "none.csv")
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_text("not parquet at all")
    with pytest.raises(DataFormatError, match="bad.parquet"):
        make(corrupt)
    with pytest.raises(ConfigError, match="window"):
        make(path, window=500)


def test_forecast_subset_of_channels(table):
    path, df = table
    dm = make(path, time_column="timestamp", target_columns=["ch2", "ch0"], stride=16)
    assert dm.model_io() == {"input_kind": "continuous", "input_dim": 3, "head": "regression", "output_dim": 2}
    sample = dm._dataset("train")[2]
    assert sample["inputs"].shape == (32, 3) and sample["targets"].shape == (32, 2)
    assert torch.equal(sample["targets"], torch.from_numpy(dm.values[33:65][:, [2, 0]]))  # window at row 32
    assert torch.equal(sample["targets"][:-1], sample["inputs"][1:, [2, 0]])
    spec = dm.serving_spec().with_task(task="Forecaster", head="regression")
    assert spec.targets == ("ch2", "ch0")
    raw = spec.output_decoder()(sample["targets"])  # back to raw units of ch2, ch0
    expected = df.select(["ch2", "ch0"]).to_numpy()[33:65]
    assert np.allclose(raw.numpy(), expected, atol=1e-4)
    with pytest.raises(ConfigError, match="among the feature columns"):
        make(path, columns=["ch0", "ch1"], target_columns=["ch2"])
    with pytest.raises(ConfigError, match="target_columns"):
        SensorDataModule(str(path), task="classification", label_column="label", target_columns=["ch0"])


def _rows(n: int, bad: dict[int, str] | None = None) -> str:
    bad = bad or {}
    return "".join(bad.get(i, f"{i},{np.sin(i / 5):.4f}") + "\n" for i in range(n))


@pytest.mark.parametrize("columns", [None, ["a"]], ids=["all-columns", "column-subset"])
def test_row_with_extra_fields_is_refused_naming_the_row(tmp_path, columns):
    """polars dropped the extra field when the column was not read (the row was accepted)."""
    path = tmp_path / "extra.csv"
    path.write_text("a,b\n" + _rows(100, {60: "60,0.5,9"}))
    with pytest.raises(DataFormatError, match=r"extra.csv'.*row 61 \(file line 62\) has 3 field\(s\), the header has 2"):
        make(path, window=8, columns=columns)
    quoted = tmp_path / "quoted.csv"  # quotes: the csv-module path (a quoted separator is one field)
    quoted.write_text('a,b\n"1,5",2\n' + _rows(40, {30: "30,1,2"}))
    with pytest.raises(DataFormatError, match=r"row 32 \(file line 33\) has 3 field"):
        make(quoted, window=8, columns=columns)


def test_header_only_csv_says_there_are_no_data_rows(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("timestamp,a,b\n")
    with pytest.raises(DataFormatError, match=r"empty.csv' has a header but no data rows"):
        make(path, window=8, time_column="timestamp")


def test_nan_text_and_unparsable_values_name_row_and_column(tmp_path):
    """A 'nan' cell made polars read the column as text: it was silently dropped from the features."""
    path = tmp_path / "nan.csv"
    path.write_text("a,b\n" + _rows(100, {42: "nan,0.5"}))
    with pytest.raises(DataFormatError, match=r"missing values.*'a': 1\}, first at data row \{'a': 43\}"):
        make(path, window=8)
    assert make(path, window=8, missing="fill").feature_names == ["a", "b"]
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n" + _rows(100, {57: "57,1.2.3"}))
    with pytest.raises(DataFormatError, match=r"junk.csv'.*column 'b', row 58 \(file line 59\): '1.2.3' is not a number"):
        make(junk, window=8)
    assert make(junk, window=8, columns=["a"]).feature_names == ["a"]  # a column not chosen is not read


def test_all_empty_column_is_missing_values_not_dropped(tmp_path):
    """polars reads a CSV column with no value as text: it was silently left out of the features
    (a Parquet column of nulls was an error)."""
    path = tmp_path / "hole.csv"
    path.write_text("a,b,c\n" + "".join(f"{i},,{i * 2}\n" for i in range(50)))
    with pytest.raises(DataFormatError, match=r"missing values.*counts \{'b': 50\}"):
        make(path, window=8)
    with pytest.raises(DataFormatError, match=r"\['b'\] have no values at all"):
        make(path, window=8, missing="fill")
    assert make(path, window=8, columns=["a", "c"]).feature_names == ["a", "c"]


def test_unreadable_tables_are_named_not_tracebacks(tmp_path):
    """Binary bytes in a .csv raised the csv module's own error; a .txt/.tsv file was read as Parquet."""
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"a,b\n\x00\x01\r\x02\"\n\x03")
    with pytest.raises(DataFormatError, match="bin.csv' is not a text CSV file"):
        make(binary, window=8)
    stray = tmp_path / "stray.csv"  # no NUL byte: the csv module reads the header and fails
    stray.write_bytes(b"a\x01\rx,b\n1,2\n")
    with pytest.raises(DataFormatError, match="stray.csv' cannot be read"):
        make(stray, window=8)
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a\tb\n1\t2\n")
    with pytest.raises(DataFormatError, match=r"t.tsv': unknown suffix '.tsv'"):
        make(tsv, window=8)


def test_text_time_column_is_refused_and_null_series_ids_are_named(tmp_path):
    """Time stamps polars cannot parse were sorted as text (t10 before t2), rows without a series id
    formed one more series: both silently."""
    path = tmp_path / "t.csv"
    path.write_text("time,sid,a\n" + "".join(f"t{i},{'' if i == 5 else i % 2},{i}\n" for i in range(40)))
    with pytest.raises(DataFormatError, match=r"time_column 'time'.*'t0' at data row 1"):
        make(path, window=8, time_column="time")
    with pytest.raises(DataFormatError, match=r"column 'sid' has 1 missing value"):
        make(path, window=8, series_column="sid")
    quoted = tmp_path / "q.csv"  # numbers in text are numbers
    quoted.write_text("time,a\n" + "".join(f'" {39 - i}",{i}\n' for i in range(40)))
    dm = make(quoted, window=8, time_column="time", normalize=False, val_fraction=0.0, test_fraction=0.0)
    assert dm.values[:, 0].tolist() == list(range(39, -1, -1))


def test_split_too_short_for_the_window_names_the_real_cause(tmp_path):
    """recipes/sensor.yaml on a short table: 'no val split is configured' although val_fraction was set."""
    path = tmp_path / "short.csv"
    path.write_text("a,b\n" + _rows(300))
    dm = make(path, window=64, val_fraction=0.1, test_fraction=0.0)
    with pytest.raises(ConfigError, match=r"validation span of 30 rows is shorter than the 65 rows one window needs; "
                                          r"lower window or raise val_fraction \(now 0.1\)"):
        dm.val_dataloader()


# --------------------------------------------------------------- held-out files, any length
def write_labeled_series(path, lengths, seed=0):
    """Long table (series_id, t, a, b, label): each series' label is the sign of its mean of ``a``."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, n in enumerate(lengths):
        sign = 1.0 if i % 2 == 0 else -1.0
        a = rng.normal(sign, 1.0, n)
        frames.append(pl.DataFrame({"series_id": [f"s{i}"] * n, "t": np.arange(n), "a": a,
                                    "b": rng.normal(0.0, 1.0, n), "label": ["pos" if sign > 0 else "neg"] * n}))
    pl.concat(frames).write_csv(path)
    return path


def labeled(path, **kw):
    kw.setdefault("task", "classification")
    return make(path, series_column="series_id", time_column="t", label_column="label", **kw)


def test_test_path_is_the_test_split_and_scores_as_by_hand(tmp_path):
    from lightning.pytorch import Trainer

    from streamssm.models import ArchConfig
    from streamssm.tasks import SequenceClassifier

    train = write_labeled_series(tmp_path / "train.csv", [40] * 6, seed=0)
    test = write_labeled_series(tmp_path / "test.csv", [40, 25, 40, 12, 40], seed=1)
    dm = labeled(train, window=40, test_path=str(test), val_fraction=0.0, test_fraction=0.0)
    assert sorted(dm._datasets) == ["test", "train"] and len(dm._dataset("test")) == 5
    assert dm.val_dataloader() == []
    torch.manual_seed(0)
    task = SequenceClassifier(arch=ArchConfig(d_model=16, n_layers=1, headdim=8, d_state=8, chunk_size=8),
                              input_kind="continuous", input_dim=2, output_dim=2)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path)
    acc = trainer.test(task, datamodule=dm, verbose=False)[0]["test/acc"]
    # by hand: train-file statistics, each held-out series whole, decision at its last row
    tr, te = pl.read_csv(train), pl.read_csv(test)
    raw = tr.select("a", "b").to_numpy()
    mean, std = raw.mean(0), raw.std(0)
    right = 0
    task.eval()
    for (sid,), rows in te.group_by(["series_id"], maintain_order=True):
        x = torch.tensor((rows.select("a", "b").to_numpy() - mean) / std, dtype=torch.float32)[None]
        with torch.no_grad():
            pred = task(x)[0, -1].argmax().item()
        right += dm.classes[pred] == rows["label"][0]
    assert acc == pytest.approx(right / 5, abs=1e-6)


def test_validation_left_out_trains_without_limit_val_batches(tmp_path):
    from lightning.pytorch import Trainer

    from streamssm.models import ArchConfig
    from streamssm.tasks import SequenceClassifier

    train = write_labeled_series(tmp_path / "train.csv", [30] * 4)
    dm = labeled(train, window=16, val_fraction=0.0, test_fraction=0.0)
    task = SequenceClassifier(arch=ArchConfig(d_model=16, n_layers=1, headdim=8, d_state=8, chunk_size=8),
                              input_kind="continuous", input_dim=2, output_dim=2)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path, max_steps=2)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 2 and not any(k.startswith("val/") for k in trainer.callback_metrics)


def test_held_out_labels_unknown_to_training_are_refused(tmp_path):
    train = write_labeled_series(tmp_path / "train.csv", [20, 20])
    test = tmp_path / "test.csv"
    test.write_text("series_id,t,a,b,label\nx,0,1.0,2.0,other\n")
    with pytest.raises(DataFormatError, match=r"test.csv.*label\(s\) \['other'\] do not occur in the training"):
        labeled(train, window=8, test_path=str(test), val_fraction=0.0)


def test_every_series_of_unequal_length_is_used(tmp_path):
    """270 series of 20..80 rows, window 64: before, only the series of >= 64 rows gave windows
    (one series of 270 in the report), silently. Now short series are padded windows (mask)."""
    lengths = [20 + (i * 7) % 61 for i in range(270)]
    path = write_labeled_series(tmp_path / "many.csv", lengths, seed=3)
    dm = labeled(path, window=64, val_fraction=0.0, test_fraction=0.0)
    ds = dm._dataset("train")
    first_row = {lo: i for i, (lo, hi) in enumerate(dm.series_bounds)}
    used = set()
    labels = pl.read_csv(path).sort("series_id", "t", maintain_order=True)
    for i in range(len(ds)):
        item = ds[i]
        n = int(item["mask"].sum())
        assert item["mask"][:n].all() and not item["mask"][n:].any() and (item["inputs"][n:] == 0).all()
        s = ds.starts[i]
        series = next(k for k, (lo, hi) in enumerate(dm.series_bounds) if lo <= s < hi)
        lo, hi = dm.series_bounds[series]
        assert n == min(64, hi - lo) and s + n == hi or n == 64
        assert dm.classes[int(item["targets"])] == labels["label"][s + n - 1]
        used.add(series)
    assert len(used) == 270 == len(first_row)
    # every series' last row ends some window (its label is read at its true last step)
    ends = {s + n for s, n in zip(ds.starts, ds.lengths, strict=True)}
    assert all(hi in ends for _, hi in dm.series_bounds)
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (8, 64)


def test_forecast_windows_dropping_series_warn_naming_how_many(tmp_path, caplog):
    path = write_labeled_series(tmp_path / "f.csv", [10, 50, 12, 60])
    with caplog.at_level("WARNING"):
        make(path, series_column="series_id", time_column="t", columns=["a", "b"], window=32,
             val_fraction=0.0, test_fraction=0.0)
    assert "train split: 2 of 4 series are shorter than the 33 rows" in caplog.text
