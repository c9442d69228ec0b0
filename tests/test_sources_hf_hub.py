"""hf_hub source, offline, on local folders laid out like Hub dataset repos."""

from pathlib import Path

import pandas as pd
import pytest

from tasks.ingest import source_fingerprint
from loraflow.sources import SourceError, hf_hub

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sources" / "hf_local"


def test_local_jsonl_folder_relative_to_base_dir():
    rows = hf_hub.read(hf_hub.Config(repo="hf_local"), FIXTURE.parent)
    assert list(rows.columns) == ["instruction", "input", "output"] and len(rows) == 3
    assert rows.loc[1, "output"] == "한국의 수도는 서울입니다."


def test_local_parquet_folder_with_nested_values_and_max_rows(tmp_path):
    (tmp_path / "ds" / "data").mkdir(parents=True)
    turns = [[{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}] for i in range(4)]
    pd.DataFrame({"conversations": turns}).to_parquet(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    rows = hf_hub.read(hf_hub.Config(repo=str(tmp_path / "ds"), max_rows=3), "/elsewhere")
    assert len(rows) == 3 and [dict(turn) for turn in rows.loc[2, "conversations"]] == turns[2]


def test_unknown_split_is_an_error_with_the_fix():
    with pytest.raises(SourceError, match=r"Unknown split.*set `split:`"):
        hf_hub.read(hf_hub.Config(repo=str(FIXTURE), split="test"), ".")


def test_fingerprint_hashes_a_local_folder_and_pins_a_remote_repo(tmp_path):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text('{"a": 1}\n')
    config = hf_hub.Config(repo="ds")
    before = source_fingerprint(config, tmp_path)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")  # hidden files are not content
    assert source_fingerprint(config, tmp_path) == before
    (folder / "data" / "train.jsonl").write_text('{"a": 2}\n')
    assert source_fingerprint(config, tmp_path) != before
    assert source_fingerprint(hf_hub.Config(repo="tatsu-lab/alpaca", revision="abc123"), tmp_path) == "tatsu-lab/alpaca@abc123"
