"""Files the ``stream`` command reads (service/sources.py): bad tables are named by the
training tables' reader (datamodules/sensor.py: scan_table), not by polars' own errors."""

from __future__ import annotations

import pytest

from streamssm.errors import DataFormatError
from streamssm.service.sources import read_source


@pytest.mark.parametrize("text,named", [
    ("", "no data rows"),
    ("a,b\n", "no data rows"),
    ("a,b\n1,2\n3,4,5\n", r"row 2 \(file line 3\) has 3 field\(s\), the header has 2"),
    ("a,b\nx,y\n", "not numeric"),
])
def test_a_bad_table_to_stream_is_named(tmp_path, text, named):
    """CLI audit: empty and ragged CSVs raised polars' own errors (NoDataError, ComputeError);
    they go through the training tables' reader now."""
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=named):
        read_source(path, columns=["a", "b"] if text.startswith("a,b\nx") else None)


def test_a_bad_history_prompt_is_named(tmp_path):
    """The same reader behind ``generate --prompt history.csv``."""
    from streamssm.generate_io import read_history

    path = tmp_path / "h.csv"
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(DataFormatError, match="row 2"):
        read_history(path, ("a", "b"))
    fake = tmp_path / "h.parquet"
    fake.write_text("a,b\n1,2\n")
    with pytest.raises(DataFormatError, match="cannot be read"):
        read_history(fake, ("a", "b"))
