"""The data half a batch at a time: the same rows and values as one batch, whatever falls on a batch boundary.

The stages run on 5-row batches over a slice of the shipped catalog arranged so that boundaries land on what
matters: a batch of conversations ends inside one title's questions (8 to 11 per title), a row set aside by the
synthesizer sits last in a batch, a whole batch of catalog rows is unusable (an empty batch downstream), a copy of a
title under a new id gives exact duplicates in different batches, and a row repeating another's id with a different
score (a conflicting duplicate id) is three batches after it. Every stage's output is compared, value by value, with
the same stage run as one batch; the store's Parquet writer is checked for the same bytes whatever the batching.
"""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraflow.config.format import FormatConfig
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.synthesizers import anime_qa
from loraflow.config.tokenize import TokenizeConfig
from loraflow.runtime.artifact_store import ArtifactStore, table_bytes
from loraflow.runtime.parquet_stream import DigestSet, ParquetStream, digests16
from loraflow.sources import csv_file, parquet_file
from tasks.format import run_format
from tasks.ingest import run_ingest
from tasks.preflight import run_preflight
from tasks.synthesize import run_synthesize
from tasks.tokenize import run_tokenize

CATALOG = Path(__file__).resolve().parent.parent / "data" / "sample" / "anime_catalog.csv"
BATCH = 5
WHOLE = 1_000_000


def boundary_catalog() -> pd.DataFrame:
    """30 catalog rows placed so that batches of 5 end on the cases the module docstring lists."""
    rows = pd.read_csv(CATALOG, dtype=str, keep_default_na=False).head(30).reset_index(drop=True)
    rows.loc[4, "Synopsis"] = ""  # last row of batch 0: its overview question is skipped, quarantined
    rows.loc[10:14, "anime_id"] = ""  # batch 2: no id on any row, every question skipped: nothing comes out
    rows.loc[17] = rows.loc[2].copy()  # batch 3: a copy of row 2 under a new id, same questions and answers
    rows.loc[17, "anime_id"] = "990017"
    rows.loc[21] = rows.loc[6].copy()  # batch 4: row 6's id with another score: a conflicting duplicate id
    rows.loc[21, "Score"] = "1.11"
    return rows


def synthesize_config() -> SynthesizeConfig:
    return SynthesizeConfig(kind="anime_qa", anime_qa=anime_qa.Options(trained_phrasings=1, heldout_phrasings=1))


def values(store: ArtifactStore, ref) -> list[dict]:
    return store.read_arrow(ref).to_pylist()


def quarantined(store: ArtifactStore, result) -> list[tuple]:
    """The quarantine as a sorted list (its order follows the batches; its rows and reasons must not)."""
    if result.quarantine is None:
        return []
    frame = store.read(result.quarantine)
    return sorted(zip(frame["reason"], frame["row_index"], frame["row_json"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    """The stages on 5-row batches and on one batch, each in its own store, from the same catalog CSV."""
    folder = tmp_path_factory.mktemp("streaming")
    boundary_catalog().to_csv(folder / "catalog.csv", index=False)
    source = csv_file.Config(path=str(folder / "catalog.csv"), name="catalog")
    results = {}
    for name, batch_rows in (("batched", BATCH), ("whole", WHOLE)):
        store = ArtifactStore(folder / name)
        raw = run_ingest(source, store, folder, batch_rows=batch_rows)
        conversations = run_synthesize([raw.output], synthesize_config(), store, batch_rows=batch_rows)
        formatted = run_format(conversations.output, FormatConfig(), str(model_dir), store, batch_rows=batch_rows)
        tokens = run_tokenize(formatted.output, TokenizeConfig(validation_fraction=0.3), str(model_dir), store, batch_rows=batch_rows)
        results[name] = (store, {"ingest": raw, "synthesize": conversations, "format": formatted, "tokenize": tokens})
    return results


@pytest.mark.parametrize("stage", ["ingest", "synthesize", "format", "tokenize"])
def test_batches_give_the_rows_and_values_of_one_batch(runs, stage):
    (batched_store, batched), (whole_store, whole) = runs["batched"], runs["whole"]
    assert values(batched_store, batched[stage].output) == values(whole_store, whole[stage].output)
    assert quarantined(batched_store, batched[stage]) == quarantined(whole_store, whole[stage])
    assert batched[stage].stats == whole[stage].stats  # unaccounted_rows included (synthesize's is 3 on main too)


def test_the_boundary_cases_happened(runs):
    store, results = runs["batched"]
    conversations = store.read(results["synthesize"].output)
    # 8 to 11 conversations per title: 5-row batches of them end inside a title's questions
    assert conversations.groupby("source_id").size().min() > BATCH and results["format"].rows_in % BATCH != 0
    set_aside = quarantined(store, results["synthesize"])
    reasons = [reason for reason, _, _ in set_aside]
    assert any(reason.startswith("overview skipped: Synopsis is") for reason in reasons)  # row 4, last of its batch
    assert not set(conversations["source_row"]) & set(range(10, 15))  # batch 2 gave no conversation at all
    assert {row for reason, row, _ in set_aside if "duplicate id with different facts" in reason} == {21}  # keeps the first
    tokens_reasons = [reason for reason, _, _ in quarantined(store, results["tokenize"])]
    assert sum(reason.startswith("duplicate: same input_ids") for reason in tokens_reasons) >= 3  # row 17 copies row 2


def test_preflight_streams_to_the_same_report(runs, model_dir):
    (batched_store, batched), (whole_store, whole) = runs["batched"], runs["whole"]
    report = run_preflight(batched["tokenize"].output, batched["format"].output, FormatConfig(), str(model_dir), batched_store)
    assert report == run_preflight(whole["tokenize"].output, whole["format"].output, FormatConfig(), str(model_dir), whole_store)
    assert report["passed"] and report["rows"] == batched["tokenize"].rows_out


def test_token_columns_are_arrow_int32_lists(runs):
    store, results = runs["batched"]
    schema = store.schema(results["tokenize"].output)
    assert schema.field("input_ids").type == pa.list_(pa.int32()) and schema.field("labels").type == pa.list_(pa.int32())


# ---- the Parquet writer and the digest set underneath


def stream_bytes(table: pa.Table, batch_rows: int, row_group_rows: int = 4) -> bytes:
    sink = io.BytesIO()
    stream = ParquetStream(sink=sink, row_group_rows=row_group_rows)
    for start in range(0, table.num_rows, batch_rows):
        stream.append(table.slice(start, batch_rows))
    stream.append(table.slice(0, 0))  # an empty batch changes nothing
    stream.close(table.schema)
    return sink.getvalue()


def test_the_same_rows_make_the_same_bytes_whatever_the_batches():
    table = pa.table({"id": [f"r{i}" for i in range(11)], "ids": [list(range(i)) for i in range(11)]})
    whole = stream_bytes(table, batch_rows=11)
    assert stream_bytes(table, batch_rows=1) == whole == stream_bytes(table, batch_rows=3)
    assert [group.num_rows for group in map(pq.ParquetFile(io.BytesIO(whole)).metadata.row_group, range(3))] == [4, 4, 3]


def test_a_later_batch_widens_the_schema_as_one_whole_write_would(tmp_path):
    frame = pd.DataFrame({"messages": [[{"role": "user", "content": f"q{i}"}] for i in range(9)], "note": [None] * 9})
    frame.loc[7, "messages"] = [{"role": "user", "content": "q7", "input": "extra"}]  # a struct field appears late
    frame.loc[8, "note"] = "typed at last"  # an all-null column gets a type
    store = ArtifactStore(tmp_path)
    writer = store.writer(stage="s", contract="c", schema_version=1, config_hash="h", row_group_rows=2)
    for start in range(0, 9, 2):
        writer.append(frame.iloc[start:start + 2])
    streamed = writer.commit()
    whole = store.write(frame, stage="s", contract="c", schema_version=1, config_hash="h")
    assert streamed == whole or store.read_arrow(streamed).to_pylist() == store.read_arrow(whole).to_pylist()
    assert store.read_arrow(streamed).to_pylist()[0]["messages"] == [{"role": "user", "content": "q0", "input": None}]
    assert [p.name for p in (tmp_path / "artifacts" / "s").iterdir() if p.name.startswith(".tmp-")] == []


def test_a_frame_written_whole_is_the_streamed_artifact(tmp_path):
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(20_000)], "n": np.arange(20_000)})
    store = ArtifactStore(tmp_path)
    writer = store.writer(stage="s", contract="c", schema_version=1, config_hash="h")
    for start in range(0, len(frame), 3_000):
        writer.append(frame.iloc[start:start + 3_000])
    assert writer.commit() == store.write(frame, stage="s", contract="c", schema_version=1, config_hash="h")
    assert len(table_bytes(frame)) > 0


def test_digest_set_finds_repeats_within_and_across_batches():
    seen = DigestSet()
    for start in range(0, 300, 7):
        seen.add_new(digests16([f"v{i}" for i in range(start, min(start + 7, 300))]))
    assert len(seen) == 300
    again = digests16(["v3", "new", "v299", "new"])
    assert seen.contains(again).tolist() == [True, False, True, False]
    assert seen.add_new(again).tolist() == [False, True, False, False]


def test_csv_batches_match_the_whole_read(tmp_path):
    text = 'id,text\n1,"a\nb"\n2,plain\n3,"x, y"\n\n4,"quoted ""q"""\n5,last\n'
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    config = csv_file.Config(path="t.csv")
    whole = csv_file.read(config, tmp_path)
    for batch_rows in (1, 2, 10):
        batches = list(csv_file.read_batches(config, tmp_path, batch_rows))
        assert pd.concat(batches).reset_index(drop=True).equals(whole)


@pytest.mark.parametrize("named_index", [True, False])
def test_parquet_batches_match_the_whole_read(tmp_path, named_index):
    frame = pd.DataFrame({"anime_id": [7, 3, 9, 1, 4], "name": list("abcde"), "score": [1.5, None, 2.0, 3.5, 4.0]})
    frame = frame.set_index("anime_id") if named_index else frame
    frame.to_parquet(tmp_path / "t.parquet", row_group_size=2)
    for options in ({}, {"columns": ["name"]}, {"max_rows": 3}):
        config = parquet_file.Config(path="t.parquet", **options)
        whole = parquet_file.read(config, tmp_path)
        batches = list(parquet_file.read_batches(config, tmp_path, 2))
        assert pd.concat(batches).reset_index(drop=True).equals(whole.reset_index(drop=True)), options


def test_a_shard_tokenized_a_batch_at_a_time_then_checked_by_partition_equals_tokenize(runs, model_dir):
    """The sharded path's tokenize on one shard: tokenize-shard on 5-row batches gives one batch's rows, quarantine and
    counts; its duplicates (copies in other batches) and leaks decided in 1 or 3 digest partitions, then merged, give
    the single-process tokens artifact, value by value, and its set-aside rows."""
    from tasks.tokenize import run_tokenize_merge, run_tokenize_shard

    config = TokenizeConfig(validation_fraction=0.3)
    shard = {name: run_tokenize_shard(runs[name][1]["format"].output, config, str(model_dir), runs[name][0], batch_rows=rows)
             for name, rows in (("batched", BATCH), ("whole", WHOLE))}
    (batched_store, batched), (whole_store, _) = runs["batched"], runs["whole"]
    assert values(batched_store, shard["batched"].output) == values(whole_store, shard["whole"].output)
    assert quarantined(batched_store, shard["batched"]) == quarantined(whole_store, shard["whole"])
    assert shard["batched"].stats == shard["whole"].stats

    source = batched_store.read(batched["synthesize"].output)["source"].iloc[0]
    for partitions in (1, 3):
        merged = run_tokenize_merge([batched["synthesize"].output], [shard["batched"].output], [source], config,
                                    str(model_dir), batched_store, batch_rows=BATCH, partitions=partitions)
        assert values(batched_store, merged.output) == values(batched_store, batched["tokenize"].output)
        assert merged.stats["duplicates"] == batched["tokenize"].stats["duplicates"] >= 3
        set_aside = [reason for result in (shard["batched"], merged) for reason, _, _ in quarantined(batched_store, result)]
        assert sorted(set_aside) == sorted(reason for reason, _, _ in quarantined(batched_store, batched["tokenize"]))
