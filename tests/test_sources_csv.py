"""CSV source on real files: encodings, BOM, quoting, empty and missing files."""

import pandas as pd
import pytest

from loraflow.sources import SourceError, csv_file


def read(tmp_path, content: bytes, **options) -> pd.DataFrame:
    (tmp_path / "data.csv").write_bytes(content)
    return csv_file.read(csv_file.Config(path="data.csv", **options), tmp_path)


def test_every_value_stays_text_as_written(tmp_path):
    rows = read(tmp_path, b"anime_id,Score,Episodes,Licensors\n1,7.21,012,UNKNOWN\n2,,nan,None\n")
    assert rows.to_dict(orient="records") == [
        {"anime_id": "1", "Score": "7.21", "Episodes": "012", "Licensors": "UNKNOWN"},
        {"anime_id": "2", "Score": "", "Episodes": "nan", "Licensors": "None"},
    ]


def test_utf8_bom_is_stripped_from_the_first_column_name(tmp_path):
    rows = read(tmp_path, "\ufeffName,Other name\nHoshi,ホシ\n".encode("utf-8"))
    assert list(rows.columns) == ["Name", "Other name"]
    assert rows.loc[0, "Other name"] == "ホシ"


@pytest.mark.parametrize("encoding,text", [("cp949", "제목,장르\n별의 노래,드라마\n"), ("latin-1", "Name,Studio\nCafé,Ñandú\n")])
def test_encoding_option(tmp_path, encoding, text):
    rows = read(tmp_path, text.encode(encoding), encoding=encoding)
    header, values = (line.split(",") for line in text.splitlines())
    assert list(rows.columns) == header and rows.iloc[0].tolist() == values


def test_wrong_encoding_is_refused_with_file_byte_offset_and_fix(tmp_path):
    prefix = b"Name,Genre\nabc,"
    content = prefix + "드라마".encode("cp949") + b"\n"
    with pytest.raises(SourceError) as error:
        read(tmp_path, content)
    message = str(error.value)
    assert "data.csv" in message and f"byte offset {len(prefix)}" in message and "encoding: cp949" in message


def test_byte_offset_counts_the_bom(tmp_path):
    with pytest.raises(SourceError, match="byte offset 9 "):
        read(tmp_path, b"\xef\xbb\xbfa,b\n1,\xff\n")


def test_quoted_commas_quotes_and_line_breaks(tmp_path):
    rows = read(tmp_path, b'Name,Synopsis\nA,"One, two ""three""\nfour"\nB,plain\n')
    assert rows["Synopsis"].tolist() == ['One, two "three"\nfour', "plain"]


def test_delimiter_and_max_rows(tmp_path):
    rows = read(tmp_path, b"a;b\n1;2\n3;4\n5;6\n", delimiter=";", max_rows=2)
    assert rows.to_dict(orient="list") == {"a": ["1", "3"], "b": ["2", "4"]}


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\n  \n"])
def test_empty_file_is_an_error_naming_the_file(tmp_path, content):
    with pytest.raises(SourceError, match=r"data\.csv: the file is empty"):
        read(tmp_path, content)


def test_missing_file_names_the_resolved_path_and_the_option(tmp_path):
    with pytest.raises(SourceError) as error:
        csv_file.read(csv_file.Config(path="nope/catalog.csv"), tmp_path)
    assert str(tmp_path / "nope" / "catalog.csv") in str(error.value) and "`path:`" in str(error.value)


def test_too_many_fields_names_the_line_and_the_fix(tmp_path):
    with pytest.raises(SourceError) as error:
        read(tmp_path, b"a,b\n1,2\n3,4,5\n")
    assert "data.csv" in str(error.value) and "line 3" in str(error.value) and "quote values" in str(error.value)


def test_the_shipped_sample_catalog_reads_completely():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    rows = csv_file.read(csv_file.Config(path="data/sample/anime_catalog.csv"), repo)
    assert len(rows) == 300 and rows["anime_id"].is_unique
    assert rows["Synopsis"].str.contains("\n").any()  # multi-line synopses survive
    used = ["Name", "English name", "Other name", "Genres", "Synopsis", "Episodes", "Producers", "Studios", "Rating", "Score", "Scored By"]
    assert not (rows.head(40)[used] == "UNKNOWN").any().any()
    assert (rows[used] == "UNKNOWN").any().any()
