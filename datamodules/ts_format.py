"""Reader of the UCR/UEA archive's ``.ts`` text format (plain Python, no extra dependency).

A file is a header of ``@key value`` lines, then ``@data`` and one case per line: the values
of each dimension separated by ``,``, dimensions separated by ``:``, and the class label last
when ``@classLabel true <labels...>``. ``?`` (or ``NaN``) marks a missing value. Lines starting
with ``#`` and blank lines are skipped. Univariate and multivariate, equal and unequal length
are read; timestamped cases (``@timeStamps true``) and regression targets are refused.

``read_ts`` gives the cases as arrays; ``ts_table`` the long-format table the sensor
datamodule reads (one row per step: ``series``, ``step``, ``dim_0`` .. ``dim_{c-1}``,
``label``). Every problem raises ``DataFormatError`` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from streamssm.errors import DataFormatError

SERIES_COLUMN = "series"
STEP_COLUMN = "step"
LABEL_COLUMN = "label"
_BOOL_KEYS = ("timestamps", "missing", "univariate", "equallength")
_MISSING = {"?"}  # float() reads NaN/nan itself


@dataclass(frozen=True)
class TsData:
    """Cases of a ``.ts`` file: ``series[i]`` (l_i, c) float64 (NaN where missing), ``labels[i]``
    (None without class labels) and the declared ``classes`` in header order."""

    series: list[np.ndarray]
    labels: list[str] | None
    classes: tuple[str, ...]

    @property
    def dims(self) -> int:
        return self.series[0].shape[1]


def _fail(path: Path, line: int, why: str) -> DataFormatError:
    return DataFormatError(f".ts file {str(path)!r}, line {line}: {why}")


def _parse_bool(path: Path, line: int, key: str, value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise _fail(path, line, f"@{key} expects true or false, got {value!r}")
    return value.lower() == "true"


def _header(path: Path, lines: list[str]) -> tuple[dict[str, object], int]:
    """Header settings and the index of the first line after ``@data``."""
    head: dict[str, object] = {}
    for i, raw in enumerate(lines):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if not text.startswith("@"):
            raise _fail(path, i + 1, f"data before @data (got {text[:40]!r}); the header ends with a line '@data'")
        name, _, rest = text[1:].partition(" ")
        key, parts = name.lower(), rest.split()
        if key == "data":
            if head.get("timestamps"):
                raise _fail(path, i + 1, "@timeStamps true is not supported; write the values without timestamps")
            if "classlabel" not in head:
                raise _fail(path, i + 1, "the header has no @classLabel line (true <labels...> or false)")
            return head, i + 1
        if key in _BOOL_KEYS:
            if len(parts) != 1:
                raise _fail(path, i + 1, f"@{name} expects one value, got {rest!r}")
            head[key] = _parse_bool(path, i + 1, name, parts[0])
        elif key in ("serieslength", "dimensions"):
            if len(parts) != 1 or not parts[0].isdigit() or int(parts[0]) < 1:
                raise _fail(path, i + 1, f"@{name} expects a positive integer, got {rest!r}")
            head[key] = int(parts[0])
        elif key == "classlabel":
            flag = _parse_bool(path, i + 1, name, parts[0] if parts else "")
            if flag == (len(parts) == 1) or len(set(parts[1:])) != len(parts) - 1:
                raise _fail(path, i + 1, f"@classLabel expects 'true <distinct labels...>' or 'false', got {rest!r}")
            head[key] = tuple(parts[1:])
        elif key == "targetlabel":
            if parts and parts[0].lower() == "true":
                raise _fail(path, i + 1, "@targetLabel true (regression) is not supported; only class labels are")
        elif key != "problemname":
            raise _fail(path, i + 1, f"unknown header key @{name}")
    raise DataFormatError(f".ts file {str(path)!r}: no '@data' line (the header must end with one)")


def _values(path: Path, line: int, dim: int, text: str) -> np.ndarray:
    fields = text.split(",")
    try:
        return np.array([np.nan if f.strip() in _MISSING else float(f) for f in fields], dtype=np.float64)
    except ValueError:
        bad = next(f for f in fields if f.strip() not in _MISSING and not _is_float(f))
        raise _fail(path, line, f"dimension {dim}: {bad.strip()!r} is not a number") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_ts(path: str | Path) -> TsData:
    """Parse a ``.ts`` file; ``DataFormatError`` (with the line number) on anything malformed."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f".ts file {str(path)!r} cannot be read: {exc}") from None
    head, first = _header(path, lines)
    classes: tuple[str, ...] = head["classlabel"]  # type: ignore[assignment]
    dims: int | None = head.get("dimensions")  # type: ignore[assignment]
    series: list[np.ndarray] = []
    labels: list[str] = []
    for i in range(first, len(lines)):
        text = lines[i].strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(":")
        if classes:
            label = parts.pop().strip()
            if label not in classes:
                raise _fail(path, i + 1, f"class label {label!r} is not among the declared {list(classes)}")
            labels.append(label)
        if dims is None:
            dims = len(parts)
        if len(parts) != dims or not parts[0]:
            what = f"{len(parts)} dimension(s)" + (" and a label" if classes else "")
            raise _fail(path, i + 1, f"{what}; expected {dims} dimension(s)" + (" then the label" if classes else ""))
        columns = [_values(path, i + 1, d, p) for d, p in enumerate(parts)]
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            raise _fail(path, i + 1, f"the dimensions of one case differ in length: {[len(c) for c in columns]}")
        case = np.stack(columns, axis=1)  # (l, c)
        want = head.get("serieslength")
        if head.get("equallength") and want is not None and len(case) != want:
            raise _fail(path, i + 1, f"{len(case)} values but @seriesLength {want} (@equalLength true)")
        if head.get("equallength") and series and len(case) != len(series[0]):
            raise _fail(path, i + 1, f"{len(case)} values, the first case has {len(series[0])} (@equalLength true)")
        series.append(case)
    if not series:
        raise DataFormatError(f".ts file {str(path)!r}: no case after @data")
    if head.get("univariate") and series[0].shape[1] != 1:
        raise DataFormatError(f".ts file {str(path)!r}: @univariate true but the cases have {dims} dimensions")
    return TsData(series, labels if classes else None, classes)


def ts_table(path: str | Path) -> pl.DataFrame:
    """The cases of a ``.ts`` file in long format, one row per step: ``series`` (``<file name>#<case>``,
    so cases of several files stay apart), ``step`` (0-based), ``dim_0`` .. and ``label`` (text)."""
    path = Path(path)
    data = read_ts(path)
    lengths = np.array([len(s) for s in data.series])
    values = np.concatenate(data.series)  # (rows, c)
    ids = [f"{path.name}#{i}" for i in range(len(lengths))]
    cols: dict[str, object] = {
        SERIES_COLUMN: np.repeat(np.array(ids, dtype=object), lengths).tolist(),
        STEP_COLUMN: np.concatenate([np.arange(n) for n in lengths]),
    }
    cols.update({f"dim_{d}": values[:, d] for d in range(data.dims)})
    if data.labels is not None:
        cols[LABEL_COLUMN] = np.repeat(np.array(data.labels, dtype=object), lengths).tolist()
    return pl.DataFrame(cols)
