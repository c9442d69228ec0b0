"""Ingest reads JSON Lines a batch at a time: the same rows, positions and quarantine as the whole read, with an
invalid line and an odd-typed record at batch boundaries, a batch of broken lines only, and a field absent from a batch."""

import json

import pandas as pd
import pytest

from data_contracts import RAW
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.stage_output import write_stage_output
from loraflow.sources import json_file
from loraflow.sources.common import SourceError
from tasks.ingest import ingest_frame, run_ingest

LINES = [
    {"id": 1, "title": "A", "tags": ["x"]},
    {"id": 2, "title": "B", "tags": ["y"]},
    "not json {",                                # ends the first batch of 3 records
    {"id": 4, "title": "D", "tags": "oops"},      # text where most records have a list: set aside
    "",                                           # blank: no position
    [1, 2],                                       # an array, not an object
    "{broken",
    {"id": 7, "title": "G"},                      # no tags in this batch at all
    {"id": 8, "title": "H", "note": "new field"},
    {"id": 9, "title": "I", "tags": ["z"]},
]


def write_jsonl(path, lines) -> None:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def quarantine_rows(store: ArtifactStore, result) -> list[tuple]:
    frame = store.read(result.quarantine) if result.quarantine else pd.DataFrame(columns=["reason", "row_index"])
    return sorted(zip(frame["row_index"], frame["reason"]))


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 4, 1000])
@pytest.mark.parametrize("max_rows", [None, 6])
def test_jsonl_batches_give_the_whole_read(tmp_path, batch_rows, max_rows):
    write_jsonl(tmp_path / "t.jsonl", LINES)
    source = json_file.Config(path="t.jsonl", max_rows=max_rows)
    rows, quarantined = ingest_frame(source, tmp_path)
    batches = list(json_file.read_batches(source, tmp_path, batch_rows))
    assert len(batches) == (1 if batch_rows == 1000 else -(-min(9, max_rows or 9) // batch_rows))
    store = ArtifactStore(tmp_path / f"store-{batch_rows}")
    result = run_ingest(source, store, tmp_path, batch_rows=batch_rows)
    whole = write_stage_output(store, stage="ingest", contract=RAW, frame=rows, rows_in=len(rows) + len(quarantined),
                               config_hash="whole", quarantined=quarantined)
    pd.testing.assert_frame_equal(store.read(result.output), store.read(whole.output))
    assert quarantine_rows(store, result) == sorted(zip(quarantined["row_index"], quarantined["reason"]))
    assert result.rows_in == len(rows) + len(quarantined) and result.stats["unaccounted_rows"] == 0


def test_an_odd_kind_is_decided_over_the_whole_file_not_the_batch(tmp_path):
    # The first batch alone has text in `tags` twice: only the whole file says a list is what most records hold.
    lines = [{"id": 1, "tags": "a"}, {"id": 2, "tags": "b"}, {"id": 3, "tags": ["c"]}, {"id": 4, "tags": ["d"]},
             {"id": 5, "tags": ["e"]}, {"id": 6, "tags": ["f"]}]
    write_jsonl(tmp_path / "t.jsonl", lines)
    source = json_file.Config(path="t.jsonl")
    [(first, rejected), _, _] = list(json_file.read_batches(source, tmp_path, 2))
    assert first.empty and [r.row for r in rejected] == [0, 1] and "4 other record(s) have list" in rejected[0].reason


def test_a_file_of_broken_lines_only_is_refused_naming_them(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", ["{oops", "{nope", "{"])
    with pytest.raises(SourceError, match=r"nothing to ingest: all 3 records are broken \(invalid JSON at line 1"):
        run_ingest(json_file.Config(path="bad.jsonl", lines=True), ArtifactStore(tmp_path / "store"), tmp_path, batch_rows=1)


def test_arrays_other_encodings_and_non_utf8_bytes_are_read_whole(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"id": 1}, {"id": 2}, {"id": 3}]))
    assert len(list(json_file.read_batches(json_file.Config(path="a.json"), tmp_path, 1))) == 1
    (tmp_path / "l.jsonl").write_bytes('{"t": "caf\u00e9"}\n{"t": "x"}\n'.encode("latin-1"))
    assert len(list(json_file.read_batches(json_file.Config(path="l.jsonl", encoding="latin-1"), tmp_path, 1))) == 1
    with pytest.raises(SourceError, match="not valid utf-8 at byte offset"):
        list(json_file.read_batches(json_file.Config(path="l.jsonl"), tmp_path, 1))
