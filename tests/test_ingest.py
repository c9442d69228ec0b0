"""The ingest stage: provenance, row accounting, quarantine, errors, fingerprints, and the Prefect task."""

import json
from pathlib import Path

import pandas as pd
import pytest

from data_contracts import QUARANTINE, RAW, check_structure
from loraflow.config.pipeline import config_hash
from loraflow.runtime.stage_output import read_input
from loraflow.runtime.artifact_store import ArtifactStore, file_sha256
from tasks.ingest import SourceError, ingest_frame, run_ingest, source_fingerprint
from loraflow.sources import csv_file, json_file

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def test_provenance_columns_come_first_with_the_source_name_and_row_position(tmp_path):
    (tmp_path / "shows.csv").write_text("Name,Score\nA,7.1\nB,UNKNOWN\nC,6.0\n")
    rows, quarantine = ingest_frame(csv_file.Config(path="shows.csv"), tmp_path)
    assert rows.columns.tolist() == ["_source", "_row", "Name", "Score"]
    assert rows["_source"].tolist() == ["shows.csv"] * 3 and rows["_row"].tolist() == [0, 1, 2]
    assert len(quarantine) == 0
    named, _ = ingest_frame(csv_file.Config(path="shows.csv", name="catalog", max_rows=2), tmp_path)
    assert named["_source"].tolist() == ["catalog", "catalog"] and named["Name"].tolist() == ["A", "B"]


def test_run_ingest_writes_raw_and_quarantine_and_accounts_for_every_record(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"text": "a"}\n{"text": broken}\n{"text": "c"}\n')
    store = ArtifactStore(tmp_path / "store")
    source = json_file.Config(path="q.jsonl")
    result = run_ingest(source, store, tmp_path)

    assert (result.stage, result.rows_in, result.rows_out, result.rows_quarantined) == ("ingest", 3, 2, 1)
    assert result.rows_in == result.rows_out + result.rows_quarantined and result.stats["unaccounted_rows"] == 0
    assert result.output.config_hash == config_hash(source) and result.output.contract == RAW.name
    raw = read_input(store, result.output, RAW)
    assert raw[["_source", "_row", "text"]].to_dict(orient="list") == {"_source": ["q.jsonl"] * 2, "_row": [0, 2], "text": ["a", "c"]}

    quarantine = store.read(result.quarantine)
    check_structure(quarantine, QUARANTINE)
    assert quarantine["reason"].tolist()[0].startswith("invalid JSON at line 2: ")
    assert quarantine["row_index"].tolist() == [1]
    assert json.loads(quarantine["row_json"][0]) == {"_source": "q.jsonl", "_row": 1, "text": '{"text": broken}'}


def test_nested_values_survive_to_parquet(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    result = run_ingest(json_file.Config(path=str(SAMPLE / "conversations.json")), store, tmp_path)
    raw = store.read(result.output)
    turns = raw.loc[0, "conversations"]
    assert [set(turn) for turn in turns] == [{"from", "value"}] * len(turns)
    assert {turn["from"] for turns in raw["conversations"] for turn in turns} == {"system", "human", "gpt"}


@pytest.mark.parametrize("config,rows", [
    (csv_file.Config(path="anime_catalog.csv"), 300),
    (json_file.Config(path="instructions.jsonl"), 65),
    (json_file.Config(path="conversations.json"), 30),
    (json_file.Config(path="quotes.jsonl"), 50),
])
def test_every_shipped_sample_ingests_cleanly(config, rows, tmp_path):
    result = run_ingest(config, ArtifactStore(tmp_path), SAMPLE)
    assert (result.rows_out, result.rows_quarantined) == (rows, 0)


def test_provenance_name_clash_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("_row,text\n1,a\n")
    with pytest.raises(SourceError, match=r"\['_row'\].*rename them"):
        ingest_frame(csv_file.Config(path="x.csv"), tmp_path)


def test_nothing_readable_is_an_error_with_the_reasons(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{oops\n{nope\n")
    with pytest.raises(SourceError, match=r"'bad.jsonl': nothing to ingest: all 2 records are broken \(invalid JSON at line 1"):
        ingest_frame(json_file.Config(path="bad.jsonl"), tmp_path)
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"no data rows"):
        ingest_frame(csv_file.Config(path="header.csv"), tmp_path)


def test_a_column_parquet_cannot_store_is_refused_by_name(tmp_path):
    (tmp_path / "mixed.jsonl").write_text('{"id": 1}\n{"id": "two"}\n')
    with pytest.raises(SourceError, match=r"column 'id' mixes value types"):
        ingest_frame(json_file.Config(path="mixed.jsonl"), tmp_path)


def test_file_fingerprint_is_the_content_hash(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("x\n1\n")
    source = csv_file.Config(path="a.csv")
    assert source_fingerprint(source, tmp_path) == file_sha256(path)
    path.write_text("x\n2\n")
    assert source_fingerprint(source, tmp_path) == file_sha256(path)
    with pytest.raises(SourceError, match="does not exist"):
        source_fingerprint(csv_file.Config(path="gone.csv"), tmp_path)


def test_ingest_task_runs_in_a_flow_and_is_cached_on_unchanged_input(prefect_api, tmp_path):
    from prefect import flow

    from loraflow.runtime.stage_task import run_stage
    from tasks.ingest import ingest_task

    (tmp_path / "rows.csv").write_text("text\nhello\n")
    store = ArtifactStore(tmp_path / "store")
    source = csv_file.Config(path="rows.csv")

    @flow
    def ingest_twice():
        kwargs = dict(source=source, base_dir=str(tmp_path), store_root=store.root,
                      source_fingerprint=source_fingerprint(source, tmp_path))
        return run_stage(ingest_task, store, **kwargs), run_stage(ingest_task, store, **kwargs)

    (first, first_cached, _), (second, second_cached, _) = ingest_twice()
    assert (first_cached, second_cached) == (False, True)
    assert second.output == first.output and store.read(second.output)["text"].tolist() == ["hello"]
