"""The UCR/UEA .ts reader on small generated texts: shapes, labels, the datamodule, malformed files."""

import numpy as np
import pytest

from streamssm.datamodules import SensorDataModule
from streamssm.datamodules.ts_format import read_ts, ts_table
from streamssm.errors import DataFormatError

UNIVARIATE = """# a comment
@problemName Tiny
@timeStamps false
@missing true
@univariate true
@equalLength true
@seriesLength 4
@classLabel true up down
@data
1.0,2.0,3.0,4.0:up
4,3,?,1:down
"""

MULTI_UNEQUAL = """@problemName Multi
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b

@data
1,2,3:4,5,6:a
7,8:9,10:b
0.5,0.25,1e-1,2,3:1,1,1,1,1:a
"""


def write(tmp_path, text, name="x.ts"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_univariate_equal_length_with_missing_values(tmp_path):
    data = read_ts(write(tmp_path, UNIVARIATE))
    assert data.classes == ("up", "down") and data.labels == ["up", "down"] and data.dims == 1
    assert np.array_equal(data.series[0][:, 0], [1, 2, 3, 4])
    assert np.isnan(data.series[1][2, 0]) and data.series[1].shape == (4, 1)


def test_multivariate_unequal_length_long_table(tmp_path):
    data = read_ts(write(tmp_path, MULTI_UNEQUAL))
    assert [s.shape for s in data.series] == [(3, 2), (2, 2), (5, 2)]
    assert np.array_equal(data.series[1], [[7, 9], [8, 10]])
    table = ts_table(tmp_path / "x.ts")
    assert table.columns == ["series", "step", "dim_0", "dim_1", "label"] and table.height == 10
    assert table["series"].unique(maintain_order=True).to_list() == ["x.ts#0", "x.ts#1", "x.ts#2"]
    assert table.filter(table["series"] == "x.ts#2")["step"].to_list() == [0, 1, 2, 3, 4]


def test_unlabeled_file(tmp_path):
    data = read_ts(write(tmp_path, "@classLabel false\n@data\n1,2\n3,4,5\n"))
    assert data.labels is None and data.classes == () and "label" not in ts_table(tmp_path / "x.ts").columns


def test_ts_file_is_a_sensor_path_with_held_out_test_file(tmp_path):
    train = write(tmp_path, MULTI_UNEQUAL, "train.ts")
    test = write(tmp_path, MULTI_UNEQUAL.replace("7,8:9,10:b", "7,8,9,9,9,9:9,10,1,1,1,1:b"), "test.ts")
    dm = SensorDataModule(str(train), task="classification", window=4, test_path=str(test),
                          val_fraction=0.0, test_fraction=0.0, batch_size=2)
    dm.setup("fit")
    assert dm.feature_names == ["dim_0", "dim_1"] and dm.classes == ["a", "b"]
    assert len(dm._dataset("train")) == 4  # 3 rows (padded), 2 rows (padded), 5 rows: two windows
    test_ds = dm._dataset("test")
    assert [int(test_ds[i]["mask"].sum()) for i in range(len(test_ds))] == [3, 4, 4, 4, 4]


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("@classLabel true a b\n@data\n1,2:a\n1,2:c\n", 4, r"class label 'c' is not among the declared \['a', 'b'\]"),
        ("@dimensions 2\n@classLabel true a\n@data\n1,2:3,4:a\n1,2:a\n", 5, r"1 dimension\(s\) and a label; expected 2"),
        ("@classLabel false\n@data\n1,x,3\n", 3, r"dimension 0: 'x' is not a number"),
        ("@classLabel true a\n@data\n1,2:1,2,3:a\n", 3, r"the dimensions of one case differ in length: \[2, 3\]"),
        ("@equalLength true\n@classLabel false\n@data\n1,2\n1,2,3\n", 5, r"3 values, the first case has 2"),
        ("@seriesLength 3\n@equalLength true\n@classLabel false\n@data\n1,2\n", 5, r"2 values but @seriesLength 3"),
        ("@classLabel true\n@data\n1:a\n", 1, r"@classLabel expects 'true <distinct labels...>'"),
        ("@classLabel maybe a\n@data\n", 1, r"@classLabel expects true or false, got 'maybe'"),
        ("@univariate yes\n", 1, r"@univariate expects true or false"),
        ("@colour red\n", 1, r"unknown header key @colour"),
        ("@classLabel false\n1,2,3\n@data\n", 2, r"data before @data"),
        ("@timeStamps true\n@classLabel false\n@data\n(0,1)\n", 3, r"@timeStamps true is not supported"),
        ("@data\n1,2\n", 1, r"the header has no @classLabel line"),
    ],
)
def test_malformed_files_are_refused_with_the_line(tmp_path, text, line, why):
    with pytest.raises(DataFormatError, match=rf"x.ts', line {line}: {why}"):
        read_ts(write(tmp_path, text))


def test_missing_data_section_or_cases(tmp_path):
    with pytest.raises(DataFormatError, match=r"no '@data' line"):
        read_ts(write(tmp_path, "@classLabel false\n"))
    with pytest.raises(DataFormatError, match=r"no case after @data"):
        read_ts(write(tmp_path, "@classLabel false\n@data\n\n"))
