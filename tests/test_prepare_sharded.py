"""The sharded data half (prepare.shards > 1) on a real 2-process Dask cluster, against the single-process path.

One test runs the flow four times on the shipped sample catalog (305 rows, plus copies of 6 rows under new ids,
so exact duplicates fall into different shards and which copy is kept depends on the merge order):
single process; 3 shards on 2 Dask workers (same formatted and tokens bytes); again, shards in process (all
cached); on the workers with one source row changed (only that row's shard recomputes).

The cluster is started once for the module (`prepare.address`), with the arguments a flow run gives its own
local cluster (`local_cluster_kwargs`): starting 2 worker processes and importing the stages into them costs
more than the runs themselves, and CI pays it once instead of three times.
"""

from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from data_contracts import RAW, TOKENS, check_structure
from loraflow.config.pipeline import load_config
from loraflow.config.prepare import PrepareConfig
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from tasks.shard import row_ids, shard_frames, shard_numbers

CATALOG = Path(__file__).resolve().parent.parent / "data" / "sample" / "anime_catalog.csv"

PER_SHARD_STAGES = ("synthesize", "format", "tokenize")


@pytest.fixture(scope="module")
def dask_address():
    from distributed import LocalCluster

    from loraflow.runtime.shards import local_cluster_kwargs

    with LocalCluster(**local_cluster_kwargs(PrepareConfig(shards=3, task_runner="dask", workers=2))) as cluster:
        assert len(cluster.workers) == 2
        yield cluster.scheduler_address


def write_config(folder, store: str, extra: str = ""):
    (folder / f"{store}.yaml").write_text(
        f"name: sharded-test\nstore: {folder / store}\nruns_dir: {folder / 'runs'}\n"
        "sources:\n  - {kind: csv, name: catalog, path: catalog.csv}\n"
        "synthesize: {kind: anime_qa}\n"
        "format: {template: chat_template, system_prompt: 'You are an anime catalog assistant.'}\n"
        "tokenize: {max_length: 384, validation_fraction: 0.2}\n" + extra
    )
    return load_config(folder / f"{store}.yaml")


@pytest.fixture
def catalog(tmp_path):
    rows = pd.read_csv(CATALOG, dtype=str, keep_default_na=False)
    copies = rows.head(6).assign(anime_id=[f"copy-{i}" for i in range(6)])  # same texts, other ids: other shards
    pd.concat([rows, copies], ignore_index=True).to_csv(tmp_path / "catalog.csv", index=False)
    return tmp_path / "catalog.csv"


def test_sharded_equals_single_process_then_cached_then_one_shard_recomputes(prefect_api, dask_address, tmp_path, catalog):
    from flows.prepare import prepare_flow

    single = prepare_flow(write_config(tmp_path, "single"))
    dask_shards = f"prepare: {{shards: 3, task_runner: dask, address: '{dask_address}'}}\n"
    first = prepare_flow(write_config(tmp_path, "sharded", dask_shards))

    # ---- same examples, same split, same bytes: training's cache key does not see the sharding
    assert first["tokens"]["sha256"] == single["tokens"]["sha256"]
    assert first["formatted"]["sha256"] == single["formatted"]["sha256"]
    merge = first["stages"]["tokenize:merge"]["stats"]
    assert merge["duplicates"] == single["stages"]["tokenize"]["stats"]["duplicates"] > 0
    assert merge["splits"] == single["stages"]["tokenize"]["stats"]["splits"]
    assert first["preflight"]["passed"]

    # ---- every stage accounts for its rows, per shard and in total; every shard artifact holds its contract
    store = ArtifactStore(first["store"])
    for name, stage in first["stages"].items():
        expanded = stage["stats"].get("rows_expanded", 0)
        assert stage["rows_in"] + expanded == stage["rows_out"] + stage["rows_quarantined"], (name, stage)
        assert stage["stats"]["unaccounted_rows"] == 0, name
    for name in PER_SHARD_STAGES:
        assert [shard["shard"] for shard in first["stages"][name]["shards"]] == [0, 1, 2]
    for shard in first["stages"]["tokenize"]["shards"]:
        ref = ArtifactRef(uri=shard["artifact"], sha256=shard["sha256"], rows=shard["rows_out"], contract="tokens",
                          schema_version=TOKENS.version, stage="tokenize-shard", config_hash="")
        check_structure(store.read(ref), TOKENS, where=shard["artifact"])
    assert first["stages"]["shard"]["rows_out"] == len(pd.read_csv(catalog, dtype=str))

    # ---- an unchanged re-run, its shards one after another in this process: the task runner is in no cache key,
    # so every stage and every shard is a cache hit
    again = prepare_flow(write_config(tmp_path, "sharded", "prepare: {shards: 3, task_runner: none}\n"))
    assert again["all_cached"], {name: stage["cached"] for name, stage in again["stages"].items()}
    assert all(shard["cached"] for name in PER_SHARD_STAGES for shard in again["stages"][name]["shards"])
    assert again["tokens"]["sha256"] == first["tokens"]["sha256"]

    # ---- one source row changed: its shard recomputes, the other shards are cache hits
    rows = pd.read_csv(catalog, dtype=str, keep_default_na=False)
    changed_id = rows.loc[10, "anime_id"]
    rows.loc[10, "Score"] = "1.23"
    rows.to_csv(catalog, index=False)
    changed_shard = int(shard_numbers([changed_id], 3)[0])
    third = prepare_flow(write_config(tmp_path, "sharded", dask_shards))
    for name in PER_SHARD_STAGES:
        recomputed = [shard["shard"] for shard in third["stages"][name]["shards"] if not shard["cached"]]
        assert recomputed == [changed_shard], (name, recomputed)
    assert third["tokens"]["sha256"] != first["tokens"]["sha256"]
    assert "1.23" in " ".join(store.read(ArtifactRef(**third["tokens"]))["reference"])


def test_shard_of_a_row_is_stable_when_rows_are_added():
    catalog = pd.read_csv(CATALOG, dtype=str, keep_default_na=False)
    raw = catalog.assign(_source="catalog", _row=range(len(catalog)))
    grown = pd.concat([raw.tail(40).assign(anime_id=lambda f: "new-" + f["anime_id"]), raw], ignore_index=True)
    grown["_row"] = range(len(grown))  # new rows in front: every old row's position moves
    before = dict(zip(raw["anime_id"], shard_numbers(row_ids(raw, "anime_id"), 4)))
    after = dict(zip(grown["anime_id"], shard_numbers(row_ids(grown, "anime_id"), 4)))
    assert all(after[anime_id] == shard for anime_id, shard in before.items())
    assert len(set(before.values())) == 4  # the hash spreads rows over every shard

    shards = shard_frames([raw], ["anime_id"], 4)
    assert sum(len(frames[0]) for frames in shards) == len(raw)
    for frames in shards:  # rows keep their source order, and a shard is a RAW artifact
        assert frames[0]["_row"].is_monotonic_increasing
        check_structure(frames[0], RAW)


def test_rows_without_an_id_shard_by_source_and_position():
    raw = pd.DataFrame({"_source": ["s"] * 3, "_row": [0, 1, 2], "anime_id": ["a", " ", None]})
    assert row_ids(raw, "anime_id") == ["a", "s:1", "s:2"]
    assert row_ids(raw, None) == ["s:0", "s:1", "s:2"]


def test_prepare_config_dask_needs_shards():
    assert PrepareConfig().shards == 1 and PrepareConfig().task_runner == "none"  # the single-process path
    with pytest.raises(ValidationError, match="needs prepare.shards >= 2"):
        PrepareConfig(task_runner="dask")
    with pytest.raises(ValidationError, match="set prepare.task_runner: dask"):
        PrepareConfig(shards=4, address="tcp://127.0.0.1:8786")
    with pytest.raises(ValidationError, match="Extra inputs"):
        PrepareConfig(shard_rows=100)


def test_the_shard_step_streams_to_the_artifacts_of_one_batch(tmp_path):
    """run_shard on 7-row batches of two sources writes the same artifacts as on one batch (each shard's rows in
    source order, the shard functions' split of the whole table), and an empty (shard, source) gets none."""
    from tasks.shard import run_shard

    catalog = pd.read_csv(CATALOG, dtype=str, keep_default_na=False).head(40)
    store = ArtifactStore(tmp_path / "store")
    raws = [store.write(catalog.assign(_source=name, _row=range(len(catalog))).head(rows), stage="ingest", contract=RAW.name,
                        schema_version=RAW.version, config_hash=name) for name, rows in (("catalog", 40), ("extra", 2))]
    plans = [run_shard(raws, ["anime_qa", None], ["anime_id", "anime_id"], 5, store, batch_rows=batch_rows) for batch_rows in (7, 10_000)]
    assert plans[0] == plans[1] and plans[0].rows_in == plans[0].rows_out == 42
    expected = shard_frames([store.read(ref) for ref in raws], ["anime_id", "anime_id"], 5)
    for shard in plans[0].shards:
        written = [store.read(ref) for ref in shard.raw_refs]
        assert [len(frame) for frame in written] == [len(frame) for frame in expected[shard.number] if len(frame)]
        pd.testing.assert_frame_equal(written[0], expected[shard.number][0], check_dtype=False)
    assert sum(len(shard.raw_refs) for shard in plans[0].shards) < 10  # "extra"'s 2 rows are in at most 2 shards
