"""Parquet source (the worked example of docs/add_a_source.md) on real files."""

import pandas as pd
import pytest

from loraflow.sources import SourceError, parquet_file


def test_reads_columns_types_nested_values_and_max_rows(tmp_path):
    frame = pd.DataFrame({"text": ["a", "b", "c"], "n": [1, 2, 3], "tags": [["x"], [], ["y", "z"]]}, index=[10, 11, 12])
    frame.to_parquet(tmp_path / "rows.parquet")  # with its pandas index: must not become the row numbering
    rows = parquet_file.read(parquet_file.Config(path="rows.parquet"), tmp_path)
    assert list(rows.columns) == ["text", "n", "tags"] and rows.index.tolist() == [0, 1, 2]
    assert [list(tags) for tags in rows["tags"]] == [["x"], [], ["y", "z"]]
    rows = parquet_file.read(parquet_file.Config(path="rows.parquet", columns=["n"], max_rows=2), tmp_path)
    assert rows.to_dict(orient="list") == {"n": [1, 2]}


def test_a_named_index_is_kept_as_a_column(tmp_path):
    pd.DataFrame({"anime_id": [7, 9], "Name": ["A", "B"]}).set_index("anime_id").to_parquet(tmp_path / "c.parquet")
    rows = parquet_file.read(parquet_file.Config(path="c.parquet"), tmp_path)
    assert rows.to_dict(orient="list") == {"Name": ["A", "B"], "anime_id": [7, 9]}


def test_unknown_column_missing_file_and_non_parquet_are_clear_errors(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"no column\(s\) \['b'\].*the file has \['a'\]"):
        parquet_file.read(parquet_file.Config(path="a.parquet", columns=["b"]), tmp_path)
    with pytest.raises(SourceError, match=r"missing\.parquet: does not exist"):
        parquet_file.read(parquet_file.Config(path="missing.parquet"), tmp_path)
    (tmp_path / "fake.parquet").write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match=r"fake\.parquet: not a readable Parquet file"):
        parquet_file.read(parquet_file.Config(path="fake.parquet"), tmp_path)
