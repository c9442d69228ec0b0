"""The contract every registered source meets. Adding a source? Add a tiny example file to EXAMPLES.

For each kind in the registry: the module implements the source interface (loraflow/sources/common.py), the
config validates through the pipeline's `sources:` union with its own schema title, every field has a
description, `max_rows` exists, the rows it reads become a RAW artifact that passes the contract with
`_source`/`_row` provenance, its fingerprint changes when a row does, its locations name the local files it
reads, and its `check` passes on the example and reports the example's data gone.
"""

import json
import shutil
import sqlite3

import pandas as pd
import pytest
from pydantic import TypeAdapter

from data_contracts import RAW, enforce
from loraflow.runtime.artifact_store import ArtifactStore
from tasks.ingest import ingest_frame, run_ingest
from loraflow.sources import (SOURCES, SourceConfig, check_source, csv_file, hf_hub, json_file, missing_interface,
                           parquet_file, source_fingerprint, source_locations, source_name, sql)

RECORDS = [{"text": "first"}, {"text": "second, with a comma"}, {"text": "third"}]
CHANGED = [{"text": "first"}, {"text": "second, changed"}, {"text": "third"}]


def csv_example(folder, records=RECORDS):
    pd.DataFrame(records).to_csv(folder / "rows.csv", index=False)
    return csv_file.Config(path="rows.csv")


def json_example(folder, records=RECORDS):
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return json_file.Config(path="rows.jsonl")


def hf_hub_example(folder, records=RECORDS):
    (folder / "dataset" / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(folder / "dataset" / "data" / "train-00000-of-00001.parquet")
    return hf_hub.Config(repo="dataset")


def parquet_example(folder, records=RECORDS):
    pd.DataFrame(records).to_parquet(folder / "rows.parquet")
    return parquet_file.Config(path="rows.parquet")


def sql_example(folder, records=RECORDS):
    with sqlite3.connect(folder / "rows.db") as connection:
        connection.execute("DROP TABLE IF EXISTS rows")
        connection.execute("CREATE TABLE rows (text TEXT)")
        connection.executemany("INSERT INTO rows VALUES (?)", [(r["text"],) for r in records])
    connection.close()
    return sql.Config(url="sqlite:///rows.db", query="SELECT text FROM rows ORDER BY rowid")


# kind -> function(folder, records=RECORDS) that writes a tiny real input holding `records` (in place of the
# last one) and returns its source config.
EXAMPLES = {"csv": csv_example, "json": json_example, "hf_hub": hf_hub_example, "parquet": parquet_example,
            "sql": sql_example}


def test_every_registered_source_has_an_example():
    assert sorted(EXAMPLES) == sorted(SOURCES), "add an example for your new source to EXAMPLES in this file"


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_module_implements_the_source_interface(kind):
    assert missing_interface(SOURCES[kind]) == []


def test_every_source_config_has_its_own_schema_title():
    titles = {kind: module.Config.model_json_schema()["title"] for kind, module in SOURCES.items()}
    assert "Config" not in titles.values() and len(set(titles.values())) == len(titles), titles


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_config_is_part_of_the_pipeline_schema(kind):
    config_model = SOURCES[kind].Config
    assert config_model.model_fields["kind"].default == kind
    assert "max_rows" in config_model.model_fields and "name" in config_model.model_fields
    assert all(field.description for field in config_model.model_fields.values()), "every field needs a description"
    minimal = {"kind": kind, **_required(config_model), **MINIMAL.get(kind, {})}
    assert isinstance(TypeAdapter(SourceConfig).validate_python(minimal), config_model)


# Keys a kind needs beyond its required fields (or values "x" would not pass), for the schema test above.
MINIMAL = {"sql": {"url": "sqlite:///x.db", "table": "t"}}


def _required(config_model) -> dict:
    return {name: "x" for name, field in config_model.model_fields.items() if field.is_required()}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_source_rows_pass_the_raw_contract(kind, tmp_path):
    config = EXAMPLES[kind](tmp_path)
    rows, quarantine = ingest_frame(config, tmp_path)
    assert isinstance(rows, pd.DataFrame) and len(quarantine) == 0
    assert list(rows.columns[:2]) == ["_source", "_row"] and rows["_row"].tolist() == [0, 1, 2]
    assert rows["text"].tolist() == [r["text"] for r in RECORDS]
    valid, broken = enforce(rows, RAW)
    assert len(valid) == len(RECORDS) and len(broken) == 0

    limited, _ = ingest_frame(config.model_copy(update={"max_rows": 2}), tmp_path)
    assert limited["_row"].tolist() == [0, 1]

    store = ArtifactStore(tmp_path / "store")
    result = run_ingest(config, store, tmp_path)
    assert result.output.contract == "raw" and store.is_valid(result.output)
    assert store.read(result.output)["text"].tolist() == rows["text"].tolist()


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_name_locations_fingerprint_and_check_come_from_the_interface(kind, tmp_path):
    config = EXAMPLES[kind](tmp_path)
    assert isinstance(source_name(config), str) and source_name(config)
    local = [location.local for location in source_locations(config, tmp_path) if location.local is not None]
    assert local and all(path.exists() and path.resolve().is_relative_to(tmp_path.resolve()) for path in local)
    assert check_source(config, tmp_path) == []

    before = source_fingerprint(config, tmp_path)
    assert source_fingerprint(config, tmp_path) == before  # stable while the data is
    EXAMPLES[kind](tmp_path, CHANGED)
    assert source_fingerprint(config, tmp_path) != before  # a changed row is seen (a live database too)

    for path in local:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    problems = check_source(config, tmp_path)
    assert problems and all(isinstance(problem, str) and "->" in problem for problem in problems), problems
