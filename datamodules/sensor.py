"""Windows over multichannel sensor tables (CSV or Parquet, read with a polars lazy scan).

Shape legend: b batch, l window length (rows), c feature channels.

A table holds one long series, or many series in long format (a ``series_column`` such as a
device id; several files without one count as one series each). Rows are sorted by
``time_column`` (within each series) when given. Each series is split by time into
train | val | test; normalization mean/std come from the training rows only and travel in
``serving_spec()`` (so serving normalizes raw rows identically).

- ``task="forecast"``: ``{"inputs": (l, c) float, "targets": (l, t) float}``, the targets being
  the inputs shifted one step ahead (next-step prediction of every channel, or of the
  ``target_columns`` subset of t channels).
- ``task="classification"``: ``{"inputs": (l, c) float, "targets": () long, "mask": (l,) bool}``;
  a window's class is the ``label_column`` value at its last valid row (per-series labels work
  the same way). Series of any length are used: a span shorter than the window is one window
  padded at the end (zeros, ``mask`` False; a causal model's valid steps do not see the padding,
  and ``SequenceClassifier`` reads its decision at the last valid step or pools the valid
  steps), and a span whose tail the stride misses gets one more window ending at its last row.
  ``window`` at least the longest series makes every series exactly one sample.

Evaluation files: ``val_path`` / ``test_path`` (same columns as ``path``) are that split,
instead of the tail fraction of every series; normalization and classes still come from the
training rows. Without validation (``val_fraction=0``, no ``val_path``) the val loader is empty
and Lightning skips validation. UCR/UEA ``.ts`` files (``ts_format``) are read like tables with
columns ``series``, ``step``, ``dim_0``.., ``label`` (the defaults of the three column roles).

Missing values (null or NaN) raise a ``DataFormatError`` naming the column (``missing="error"``)
or are filled per series by linear interpolation and edge filling (``missing="fill"``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from streamssm.datamodules import ts_format
from streamssm.datamodules._common import (
    BaseDataModule,
    EpochShuffleSampler,
    check_fractions,
    check_positive,
    resolve_files,
    span_too_short,
    split_points,
    tile_starts,
)
from streamssm.encoding import Normalizer
from streamssm.errors import ConfigError, DataFormatError
from streamssm.serving import ServingSpec

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".parquet", ".pq", ".ts")
_FILE_COLUMN = "__streamssm_file"
_ROW_COLUMN = "__streamssm_row"


def scan_table(path: Path) -> pl.LazyFrame:
    """Lazy scan of one CSV or Parquet file (by suffix); schema problems raise ``DataFormatError``.

    A CSV is checked first (``check_csv_rows``): every row has the header's field count and
    there is at least one data row.
    """
    suffix = path.suffix.lower()
    if suffix == ".ts":
        return ts_format.ts_table(path).lazy()
    if suffix not in TABLE_SUFFIXES:
        raise DataFormatError(f"table {str(path)!r}: unknown suffix {path.suffix!r}; expected one of {list(TABLE_SUFFIXES)}")
    try:
        if suffix == ".csv":
            with open(path, "rb") as fh:
                if b"\x00" in fh.read(4096):
                    raise DataFormatError(f"table {str(path)!r} is not a text CSV file (binary content)")
                fh.seek(0)
                header = fh.readline()
            check_csv_rows(path, len(next(csv.reader([header.decode("utf-8", "replace")]), [])))
            lf = pl.scan_csv(path, try_parse_dates=True, infer_schema_length=10_000)
        else:
            lf = pl.scan_parquet(path)
        lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError, csv.Error) as exc:
        raise DataFormatError(f"table {str(path)!r} cannot be read: {exc}") from None
    return lf


def read_numeric_columns(path: Path, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """The ``names`` columns (None: every numeric one) of a CSV/Parquet table read by
    :func:`scan_table` -> ((l, c) float64 rows, the column names); ``DataFormatError`` naming
    missing or non-numeric columns (``stream`` sources, ``generate`` history prompts)."""
    frame = scan_table(path).collect()
    names = list(names) if names else [n for n, t in frame.schema.items() if t.is_numeric()]
    missing = [n for n in names if n not in frame.columns]
    if missing or not names:
        raise DataFormatError(f"{path}: columns {missing or names} not found; the table has {frame.columns}")
    try:
        return frame.select([pl.col(n).cast(pl.Float64) for n in names]).to_numpy(), names
    except pl.exceptions.PolarsError as exc:
        raise DataFormatError(f"{path}: columns {names} are not numeric: {exc}") from None


def _ragged(path: Path, line: int, fields: int, expected: int) -> DataFormatError:
    return DataFormatError(
        f"table {str(path)!r}: row {line - 1} (file line {line}) has {fields} field(s), the header has {expected}; "
        f"fix or remove that row"
    )


def check_csv_rows(path: Path, expected: int, block: int = 1 << 24) -> None:
    """Raise ``DataFormatError`` naming the first row whose field count differs from the
    header's (polars would drop extra fields of unread columns and read missing ones as null),
    or saying that the file has a header but no data rows. Blank lines are skipped.

    Files without quote characters are checked in blocks with numpy (separators per line); a
    file with quotes goes through Python's ``csv`` module (fields may hold separators/newlines).
    """
    with open(path, "rb") as fh:
        fh.readline()  # header
        line, rows, carry = 1, 0, b""
        while chunk := fh.read(block):
            if b'"' in chunk:
                return _check_csv_quoted(path, expected)
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            rows, line = _check_lines(path, np.frombuffer(data[:cut], dtype=np.uint8), expected, rows, line)
        if carry:
            rows, line = _check_lines(path, np.frombuffer(carry + b"\n", dtype=np.uint8), expected, rows, line)
    if rows == 0:
        raise DataFormatError(f"table {str(path)!r} has a header but no data rows")


def _check_lines(path: Path, data: np.ndarray, expected: int, rows: int, line: int) -> tuple[int, int]:
    """Field counts of the complete lines in ``data`` (which ends with a newline)."""
    ends = np.flatnonzero(data == ord("\n"))
    commas = np.concatenate([[0], np.cumsum(data == ord(","))[ends]])
    starts = np.concatenate([[0], ends[:-1] + 1])
    length = ends - starts - (data[np.maximum(ends - 1, 0)] == ord("\r"))  # bytes before \r\n or \n
    fields = np.diff(commas) + 1
    blank = length == 0
    bad = np.flatnonzero(~blank & (fields != expected))
    if bad.size:
        raise _ragged(path, line + 1 + int(bad[0]), int(fields[bad[0]]), expected)
    return rows + int((~blank).sum()), line + ends.size


def _check_csv_quoted(path: Path, expected: int) -> None:
    rows = 0
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != expected:
                raise _ragged(path, reader.line_num, len(fields), expected)
            rows += 1
    if rows == 0:
        raise DataFormatError(f"table {str(path)!r} has a header but no data rows")


def numeric_text_columns(
    lf: pl.LazyFrame, path: Path, keep_text: set[str | None], only: list[str] | None = None
) -> pl.LazyFrame:
    """Cast text columns that hold numbers (``nan``/``inf`` spelled out, a stray space, ...) to
    Float64; a column mixing numbers and other text raises ``DataFormatError`` naming the row,
    column and value. Columns without any number, and ``keep_text``, stay text; with ``only``
    (the chosen feature columns) no other column is looked at."""
    schema = lf.collect_schema()
    text = [c for c, d in schema.items() if d == pl.String and c not in keep_text and (only is None or c in only)]
    if not text:
        return lf
    num = {c: pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in text}
    given = {c: pl.col(c).str.strip_chars().fill_null("") != "" for c in text}
    stats = lf.select(
        [num[c].is_not_null().sum().alias(f"{c}\0num") for c in text]
        + [given[c].sum().alias(f"{c}\0given") for c in text]
    ).collect().row(0, named=True)
    casts = []
    for c in text:
        n_num, n_given = stats[f"{c}\0num"], stats[f"{c}\0given"]
        if n_num == 0 and n_given > 0:  # a text column; an all-empty one is a numeric column of nulls
            continue
        if n_num < n_given:
            row, value = (
                lf.with_row_index(_ROW_COLUMN).filter(given[c] & num[c].is_null())
                .select(_ROW_COLUMN, c).head(1).collect().row(0)
            )
            raise DataFormatError(
                f"table {str(path)!r}: column {c!r}, row {row + 1} (file line {row + 2}): {value!r} is not a number "
                f"({n_num} other value(s) of the column are); fix the value, leave the cell empty to mark it "
                f"missing, or choose the feature columns with `columns`"
            )
        casts.append(num[c].alias(c))
    return lf.with_columns(casts) if casts else lf


class WindowDataset(Dataset):
    """Index -> window starting at row ``starts[index]`` of the (normalized) value array.

    Classification windows hold ``lengths[index]`` valid rows (default: ``window``), padded to
    ``window`` with zeros and a False ``mask``.
    """

    def __init__(
        self,
        values: np.ndarray,
        starts: list[int],
        window: int,
        labels: np.ndarray | None,
        target_index: list[int] | None = None,
        lengths: list[int] | None = None,
    ) -> None:
        self.values = values  # (rows, c) float32
        self.starts = starts
        self.window = window
        self.labels = labels  # (rows,) int64 class ids, or None for forecasting
        self.target_index = target_index  # forecast only these channels (None: all)
        self.lengths = lengths if lengths is not None else [window] * len(starts)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.starts[int(index)]
        if self.labels is None:
            x = self.values[s : s + self.window + 1]  # (l+1, c)
            y = x[1:] if self.target_index is None else x[1:, self.target_index]  # (l, t)
            return {"inputs": torch.from_numpy(x[:-1]), "targets": torch.from_numpy(np.ascontiguousarray(y))}
        n = self.lengths[int(index)]
        x = torch.zeros(self.window, self.values.shape[1])  # (l, c)
        x[:n] = torch.from_numpy(self.values[s : s + n])
        mask = torch.arange(self.window) < n
        return {"inputs": x, "targets": torch.tensor(int(self.labels[s + n - 1]), dtype=torch.long), "mask": mask}



def classification_windows(spans: list[tuple[int, int]], window: int, stride: int) -> tuple[list[int], list[int]]:
    """Window starts and valid lengths covering every span: a span shorter than ``window`` is one
    window of its length; a longer one is tiled by ``stride`` plus a window ending at its last row
    when the tiling misses it (so every series' last label is used)."""
    starts: list[int] = []
    lengths: list[int] = []
    for lo, hi in spans:
        if hi - lo < window:
            starts.append(lo)
            lengths.append(hi - lo)
            continue
        tiled = tile_starts(lo, hi, window, stride)
        if tiled[-1] + window < hi:
            tiled.append(hi - window)
        starts += tiled
        lengths += [window] * len(tiled)
    return starts, lengths


def _is_ts(path: str | list[str]) -> bool:
    """Whether ``path`` names ``.ts`` files (by suffix; a folder is not looked into)."""
    items = [path] if isinstance(path, (str, Path)) else list(path)
    return bool(items) and all(str(p).lower().endswith(".ts") for p in items)


class SensorDataModule(BaseDataModule):
    """Forecasting or window classification over CSV/Parquet sensor tables.

    Args:
        path: a CSV/Parquet file, folder, glob, or list of them (same columns in every file).
        columns: feature columns (default: every numeric column other than time/series/label).
        target_columns: forecast only these feature columns (default: all features).
        time_column: sort rows by this column (within each series); None keeps file order.
        series_column: column naming the series of each row (long format).
        label_column: class label per row (required for ``task="classification"``).
        task: "forecast" (next step, regression) or "classification" (label of each window).
        window: rows per model input (l). stride: rows between window starts (default l).
        val_fraction / test_fraction: tail share of every series held out (by time); ignored for
            a split given as a file.
        val_path / test_path: held-out file(s) (same columns as ``path``) for that split.
        missing: "error" on null/NaN features, or "fill" (interpolate per series).
        normalize: standardize features with train-split mean/std.
    """

    input_files = {"path": TABLE_SUFFIXES, "val_path": TABLE_SUFFIXES, "test_path": TABLE_SUFFIXES}

    def __init__(
        self,
        path: str | list[str],
        columns: list[str] | None = None,
        target_columns: list[str] | None = None,
        time_column: str | None = None,
        series_column: str | None = None,
        label_column: str | None = None,
        task: Literal["forecast", "classification"] = "forecast",
        window: int = 128,
        stride: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        val_path: str | list[str] | None = None,
        test_path: str | list[str] | None = None,
        missing: Literal["error", "fill"] = "error",
        normalize: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if _is_ts(path):  # the long table of a .ts file has fixed column names
            series_column = series_column or ts_format.SERIES_COLUMN
            time_column = time_column or ts_format.STEP_COLUMN
            label_column = label_column or (ts_format.LABEL_COLUMN if task == "classification" else None)
        problems = []
        if task not in ("forecast", "classification"):
            problems.append(f"task must be 'forecast' or 'classification', got {task!r}")
        if task == "classification" and not label_column:
            problems.append("task='classification' needs label_column")
        if missing not in ("error", "fill"):
            problems.append(f"missing must be 'error' or 'fill', got {missing!r}")
        special = [c for c in (time_column, series_column, label_column) if c]
        if len(set(special)) != len(special):
            problems.append(f"time_column, series_column and label_column must differ, got {special}")
        if columns is not None and (not columns or set(columns) & set(special)):
            problems.append(f"columns must be a non-empty list without the time/series/label columns, got {columns}")
        if target_columns is not None and (task != "forecast" or not target_columns):
            problems.append(f"target_columns applies to task='forecast' and must be non-empty, got {target_columns}")
        if problems:
            raise ConfigError("SensorDataModule: " + "; ".join(problems))
        check_positive("window", window)
        if stride is not None:
            check_positive("stride", stride)
        self.paths = {"val": val_path, "test": test_path}
        val_fraction = 0.0 if val_path is not None else val_fraction
        test_fraction = 0.0 if test_path is not None else test_fraction
        check_fractions(val_fraction, test_fraction)
        if stride is not None and stride > window:
            log.warning("stride=%d > window=%d: the rows between windows are never used", stride, window)
        self.save_hyperparameters(logger=False)
        self.path = path
        self.columns = list(columns) if columns is not None else None
        self.target_columns = list(target_columns) if target_columns is not None else None
        self.target_index: list[int] | None = None
        self.time_column = time_column
        self.series_column = series_column
        self.label_column = label_column
        self.task = task
        self.window = int(window)
        self.stride = int(stride) if stride is not None else int(window)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.missing = missing
        self.normalize = bool(normalize)
        self.feature_names: list[str] = []
        self.classes: list[Any] = []
        self.normalizer: Normalizer | None = None
        self.values: np.ndarray | None = None  # (rows, c) float32, normalized
        self.label_ids: np.ndarray | None = None  # (rows,) int64
        self.series_bounds: list[tuple[int, int]] = []  # row range of each series
        self.split_rows: dict[str, list[tuple[int, int]]] = {}
        self._source = str(path)

    # ------------------------------------------------------------------ metadata
    def model_io(self) -> dict[str, Any]:
        self._ensure_loaded()
        c = len(self.feature_names)
        if self.task == "classification":
            return {"input_kind": "continuous", "input_dim": c, "head": "classifier", "output_dim": len(self.classes)}
        t = c if self.target_index is None else len(self.target_index)
        return {"input_kind": "continuous", "input_dim": c, "head": "regression", "output_dim": t}

    def serving_spec(self) -> ServingSpec:
        self._ensure_loaded()
        assert self.normalizer is not None  # set by _load
        stats = self.normalizer.to_dict()
        return ServingSpec(
            modality="sensor", encoding="float", channels=len(self.feature_names),
            channel_names=tuple(self.feature_names), mean=tuple(stats["mean"]), std=tuple(stats["std"]),
            targets=tuple(self.target_columns or ()),
            classes=tuple(self.classes) if self.task == "classification" else (),
            window=self.window, options=(("time_column", self.time_column),) if self.time_column else (),
        )

    # ------------------------------------------------------------------ loading
    def _ensure_loaded(self) -> None:
        if self.values is None:
            self._load()

    def _scan(self, spec: str | list[str], what: str) -> tuple[pl.LazyFrame, str | None]:
        """All files as one lazy frame (with a file column when several files lack a series column)."""
        paths = resolve_files(spec, what, TABLE_SUFFIXES)
        keep_text = {self.time_column, self.series_column, self.label_column}
        frames = [numeric_text_columns(scan_table(p), p, keep_text, self.columns) for p in paths]
        schemas = [f.collect_schema() for f in frames]
        names0 = list(schemas[0].names())
        for p, s in zip(paths[1:], schemas[1:], strict=True):
            if list(s.names()) != names0:
                raise DataFormatError(
                    f"table {str(p)!r} has columns {list(s.names())}, but {str(paths[0])!r} has {names0}"
                )
        self._source = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        series = self.series_column
        if len(frames) > 1 and series is None:
            frames = [f.with_columns(pl.lit(i).alias(_FILE_COLUMN)) for i, f in enumerate(frames)]
            series = _FILE_COLUMN
        try:
            lf = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
        except pl.exceptions.PolarsError as exc:
            raise DataFormatError(f"tables {self._source} cannot be combined: {exc}") from None
        return lf, series

    def _select_features(self, schema: pl.Schema) -> list[str]:
        available = list(schema.names())
        for role, col in (
            ("time_column", self.time_column),
            ("series_column", self.series_column),
            ("label_column", self.label_column),
        ):
            if col is not None and col not in schema:
                raise DataFormatError(f"{role} {col!r} not found in {self._source}; available columns: {available}")
        special = {self.time_column, self.series_column, self.label_column, _FILE_COLUMN}
        if self.columns is None:
            features = [n for n, d in schema.items() if n not in special and d.is_numeric()]
            if not features:
                raise DataFormatError(f"no numeric feature column in {self._source}; columns: {dict(schema)}")
            return features
        missing = [c for c in self.columns if c not in schema]
        if missing:
            raise DataFormatError(f"column(s) {missing} not found in {self._source}; available columns: {available}")
        bad = {c: str(schema[c]) for c in self.columns if not schema[c].is_numeric()}
        if bad:
            raise DataFormatError(f"feature column(s) must be numeric, got {bad} in {self._source}")
        return list(self.columns)

    def _collect(self, spec: str | list[str], what: str) -> tuple[pl.DataFrame, str | None]:
        lf, series = self._scan(spec, what)
        schema = lf.collect_schema()
        features = self._select_features(schema)
        if self.feature_names and features != self.feature_names:
            raise DataFormatError(f"{what} {self._source} has feature columns {features}, the training file "
                                  f"{self.feature_names}; pass the same columns (or set `columns`)")
        self.feature_names = features
        if self.target_columns is not None:
            stray = [c for c in self.target_columns if c not in self.feature_names]
            if stray:
                raise ConfigError(
                    f"target_columns {stray} must be among the feature columns {self.feature_names} "
                    f"(targets are the next values of input channels)"
                )
            self.target_index = [self.feature_names.index(c) for c in self.target_columns]
        if self.time_column is not None and schema[self.time_column] == pl.String:
            lf = self._numeric_time(lf)
        keep = [c for c in (series, self.time_column) if c] + self.feature_names
        keep += [self.label_column] if self.label_column else []
        lf = lf.select(keep).with_row_index(_ROW_COLUMN)
        order = [c for c in (series, self.time_column) if c]
        if order:
            lf = lf.sort(order + [_ROW_COLUMN])  # stable: ties keep file order
        lf = lf.with_columns([pl.col(c).cast(pl.Float64).fill_nan(None) for c in self.feature_names])
        try:
            df = lf.collect()
        except pl.exceptions.PolarsError as exc:
            raise DataFormatError(f"cannot read {self._source}: {exc}") from None
        if df.height == 0:
            raise DataFormatError(f"{self._source} holds no rows")
        return df, series

    def _numeric_time(self, lf: pl.LazyFrame) -> pl.LazyFrame:
        """A text ``time_column`` (polars read neither numbers nor dates in it) as Float64, or a
        ``DataFormatError`` naming a value: sorting the text would order 't10' before 't2'."""
        col = self.time_column
        num = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
        bad = lf.with_row_index(_ROW_COLUMN).filter(pl.col(col).is_not_null() & num.is_null())
        first = bad.select(_ROW_COLUMN, col).head(1).collect()
        if first.height:
            row, value = first.row(0)
            raise DataFormatError(
                f"time_column {col!r} of {self._source} holds text that is neither a number nor a date polars "
                f"can parse ({value!r} at data row {row + 1}), so rows cannot be ordered by time; write numbers or "
                f"ISO 8601 dates (2024-01-31 12:00:00), or leave time_column unset to keep the file order"
            )
        return lf.with_columns(num.alias(col))

    def _handle_missing(self, df: pl.DataFrame, series: str | None) -> pl.DataFrame:
        for col in [c for c in (self.time_column, self.series_column, self.label_column) if c]:
            nulls = df[col].null_count()
            if nulls:
                raise DataFormatError(f"column {col!r} has {nulls} missing value(s) in {self._source}")
        counts = {c: df[c].null_count() for c in self.feature_names}
        holes = {c: n for c, n in counts.items() if n}
        if not holes:
            return df
        if self.missing == "error":
            first = {c: int(df[_ROW_COLUMN].filter(df[c].is_null())[0]) + 1 for c in holes}
            raise DataFormatError(
                f"missing values (empty, null, NaN or 'nan') in {self._source}: counts {holes}, first at data row "
                f"{first} (1-based, the files in order; a CSV's file line is the row + 1); set missing='fill' to "
                f"interpolate them"
            )
        fill = [pl.col(c).interpolate().forward_fill().backward_fill() for c in holes]
        df = df.with_columns([f.over(series) for f in fill] if series else fill)
        empty = [c for c in holes if df[c].null_count()]
        if empty:
            raise DataFormatError(f"column(s) {empty} have no values at all in some series of {self._source}")
        log.info("filled missing values: %s", holes)
        return df

    def _read(self, spec: str | list[str], what: str) -> tuple[pl.DataFrame, np.ndarray, list[tuple[int, int]]]:
        """One table: its frame, feature values (rows, c) float32 raw, and the row range of each series."""
        df, series = self._collect(spec, what)
        df = self._handle_missing(df, series)
        raw = df.select(self.feature_names).to_numpy(order="c").astype(np.float32)  # (rows, c)
        if not np.isfinite(raw).all():
            cols = [self.feature_names[j] for j in np.flatnonzero(~np.isfinite(raw).all(axis=0))]
            raise DataFormatError(f"column(s) {cols} of {self._source} contain infinite values")
        if series is not None:
            sid = df[series].to_numpy()
            cuts = np.flatnonzero(sid[1:] != sid[:-1]) + 1
            edges = [0, *cuts.tolist(), df.height]
        else:
            edges = [0, df.height]
        return df, raw, list(zip(edges[:-1], edges[1:], strict=True))

    def _load(self) -> None:
        df, raw, self.series_bounds = self._read(self.path, "path")
        self.split_rows = {"train": [], "val": [], "test": []}
        for lo, hi in self.series_bounds:
            a, b = split_points(hi - lo, self.val_fraction, self.test_fraction)
            for split, s, e in (("train", lo, lo + a), ("val", lo + a, lo + b), ("test", lo + b, hi)):
                if e > s:
                    self.split_rows[split].append((s, e))
        train = np.concatenate([raw[s:e] for s, e in self.split_rows["train"]]) if self.split_rows["train"] else raw[:0]
        if len(train) == 0:
            raise ConfigError(f"no training rows: the series are too short for the val/test fractions ({self._source})")
        classify = self.task == "classification"
        if classify:
            assert self.label_column is not None  # checked in __init__
            self.classes = df[self.label_column].unique().sort().to_list()
        raws, ids = [raw], [self._label_ids(df) if classify else None]
        for split, spec in self.paths.items():
            if spec is None:
                continue
            held_df, held_raw, bounds = self._read(spec, f"{split}_path")
            offset = sum(len(r) for r in raws)
            self.split_rows[split] = [(lo + offset, hi + offset) for lo, hi in bounds]
            raws.append(held_raw)
            ids.append(self._label_ids(held_df) if classify else None)
        raw = np.concatenate(raws) if len(raws) > 1 else raw
        if self.normalize:
            self.normalizer = Normalizer.fit(train)
            self.values = self.normalizer.apply(torch.from_numpy(raw)).numpy()
        else:
            c = raw.shape[1]
            self.normalizer = Normalizer([0.0] * c, [1.0] * c)
            self.values = raw
        self.label_ids = np.concatenate(ids) if classify else None

    def _label_ids(self, df: pl.DataFrame) -> np.ndarray:
        """Class ids (rows,) int64 of the label column of the table just read; a class absent
        from ``path`` raises."""
        labels = df[self.label_column]
        lookup = {v: i for i, v in enumerate(self.classes)}
        unknown = sorted({v for v in labels.unique().to_list() if v not in lookup}, key=str)
        if unknown:
            raise DataFormatError(
                f"{self._source}: label(s) {unknown[:5]} do not occur in the training file(s) (classes {self.classes})"
            )
        return np.array([lookup[v] for v in labels.to_list()], dtype=np.int64)

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self._ensure_loaded()
        assert self.values is not None  # set by _load
        classify = self.task == "classification"
        need = self.window if classify else self.window + 1
        for split in ("train", "val", "test"):
            spans = self.split_rows[split]
            if classify:
                starts, lengths = classification_windows(spans, self.window, self.stride)
            else:
                starts, lengths = [s for lo, hi in spans for s in tile_starts(lo, hi, need, self.stride)], None
                short = sum(hi - lo < need for lo, hi in spans)
                if short and starts:
                    log.warning("%s split: %d of %d series are shorter than the %d rows a window needs and are not "
                                "used; lower window to use them", split, short, len(spans), need)
            if starts:
                self._datasets[split] = WindowDataset(
                    self.values, starts, self.window, self.label_ids, self.target_index, lengths
                )
            elif split == "train":
                longest = max((hi - lo for lo, hi in self.split_rows["train"]), default=0)
                raise ConfigError(
                    f"window={self.window}: no training window fits (needs {need} rows, the longest training "
                    f"span has {longest}); use a smaller window or more data"
                )
            elif self.split_rows[split] or self._fraction(split) > 0:
                longest = max((hi - lo for lo, hi in self.split_rows[split]), default=0)
                self._split_unusable(split, span_too_short(split, longest, need, "rows", "window",
                                                           self._fraction(split)))

    def val_dataloader(self):  # noqa: ANN201 - DataLoader
        """The validation windows; an empty list (Lightning skips validation) when none is configured."""
        if self.paths["val"] is None and self.val_fraction == 0:
            return []
        return self._loader("val")

    def _fraction(self, split: str) -> float:
        return {"val": self.val_fraction, "test": self.test_fraction}.get(split, 0.0)

    def train_dataloader(self):  # noqa: ANN201 - DataLoader
        return self._loader("train", sampler=EpochShuffleSampler(len(self._dataset("train")), self.seed))

    def predict_dataloader(self):  # noqa: ANN201 - DataLoader
        """The test windows when a test split exists, else the validation windows."""
        self._dataset("train")
        return self._loader("test" if "test" in self._datasets else "val")
