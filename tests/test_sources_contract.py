"""The contract every registered source meets. Adding a source? Add a tiny example file to EXAMPLES.

For each kind in the registry: the config validates through the pipeline's `sources:` union, every field
has a description, `max_rows` exists, and the rows it reads become a RAW artifact that passes the contract
with `_source`/`_row` provenance.
"""

import json

import pandas as pd
import pytest
from pydantic import TypeAdapter

from data_contracts import RAW, enforce
from loraflow.store import ArtifactStore
from tasks.ingest import ingest_frame, run_ingest, source_fingerprint
from tasks.sources import SOURCES, SourceConfig, csv_file, hf_hub, json_file, parquet_file

RECORDS = [{"text": "first"}, {"text": "second, with a comma"}, {"text": "third"}]


def csv_example(folder):
    pd.DataFrame(RECORDS).to_csv(folder / "rows.csv", index=False)
    return csv_file.Config(path="rows.csv")


def json_example(folder):
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return json_file.Config(path="rows.jsonl")


def hf_hub_example(folder):
    (folder / "dataset" / "data").mkdir(parents=True)
    pd.DataFrame(RECORDS).to_parquet(folder / "dataset" / "data" / "train-00000-of-00001.parquet")
    return hf_hub.Config(repo="dataset")


def parquet_example(folder):
    pd.DataFrame(RECORDS).to_parquet(folder / "rows.parquet")
    return parquet_file.Config(path="rows.parquet")


# kind -> function(folder) that writes a tiny real input holding RECORDS and returns its source config.
EXAMPLES = {"csv": csv_example, "json": json_example, "hf_hub": hf_hub_example, "parquet": parquet_example}


def test_every_registered_source_has_an_example():
    assert sorted(EXAMPLES) == sorted(SOURCES), "add an example for your new source to EXAMPLES in this file"


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_config_is_part_of_the_pipeline_schema(kind):
    config_model = SOURCES[kind].Config
    assert config_model.model_fields["kind"].default == kind
    assert "max_rows" in config_model.model_fields and "name" in config_model.model_fields
    assert all(field.description for field in config_model.model_fields.values()), "every field needs a description"
    assert isinstance(TypeAdapter(SourceConfig).validate_python({"kind": kind, **_required(config_model)}), config_model)


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
    assert isinstance(source_fingerprint(config, tmp_path), str)
