"""Train, evaluate and publish across hosts that share an s3:// store (moto's server on a loopback port): their folders
travel through the store (loraflow.runtime.store_folders), checked file by file, and with locks.backend: object-store
two workers that share only the bucket and the Prefect API run the finetune flow at once: one trains, evaluates and
publishes, the other waits for its lock and reuses all three, with the folders fetched into its own cache."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from loraflow.publishing.result import PublishResult
from loraflow.runtime.store_folders import (FOLDER_MANIFEST, FolderFetchError, fetch_folder, from_store, relocated,
                                            ship_folder)
from tests.test_finetune_flow import tiny_config
from tests.two_hosts import FINETUNE, held_stage_lock, one_waits_for_the_other, start_worker, summary_of
from tests.test_store_s3 import bucket, keys, s3_endpoint  # noqa: F401  (fixtures: a moto S3 server and a bucket)

REPO = Path(__file__).resolve().parent.parent


def stage_folder(root: Path) -> Path:
    """A finished train folder as the train stage leaves it: an adapter with its manifest, metrics, checkpoints."""
    folder = root / "train" / "0123abcd"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (folder / "adapter" / "loraflow-adapter.json").write_text('{"fingerprint": "f00d"}')
    (folder / "metrics.json").write_text('{"final_loss": 1.5}')
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"resumable state, not shipped")
    return folder


def file_hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != FOLDER_MANIFEST}


def test_a_shipped_folder_is_fetched_checked_and_a_damaged_one_refused(bucket, tmp_path):
    store = f"s3://{bucket.name}/team/store"
    made = stage_folder(tmp_path / "host-a")
    assert ship_folder(store, made) == f"{store}/folders/train/0123abcd"
    shipped = keys(bucket, "team/store/folders/")
    assert f"team/store/folders/train/0123abcd/{FOLDER_MANIFEST}" in shipped
    assert not [key for key in shipped if "/checkpoints/" in key]  # resumable state stays on the host that trained

    fetched = tmp_path / "host-b" / "train" / "0123abcd"
    assert fetch_folder(store, fetched)
    assert file_hashes(fetched) == {name: sha for name, sha in file_hashes(made).items() if not name.startswith("checkpoints/")}

    weights = "team/store/folders/train/0123abcd/adapter/adapter_model.safetensors"
    bucket.client.put_object(Bucket=bucket.name, Key=weights, Body=b"truncated")
    elsewhere = tmp_path / "host-c" / "train" / "0123abcd"
    with pytest.raises(FolderFetchError, match="adapter/adapter_model.safetensors: sha256 .* delete s3://"):
        fetch_folder(store, elsewhere)
    assert not elsewhere.exists()  # nothing half-fetched is left where a reader looks
    assert not fetch_folder(store, tmp_path / "host-c" / "train" / "not-shipped")


def test_a_local_store_ships_and_fetches_nothing(tmp_path):
    made = stage_folder(tmp_path / "store")
    assert ship_folder(str(tmp_path / "store"), made) is None
    assert not (tmp_path / "store" / "folders").exists() and not (made / FOLDER_MANIFEST).exists()
    result = PublishResult(model_dir=str(tmp_path / "elsewhere" / "publish" / "99" / "model"), files={},
                           max_logit_diff=0.0, merge_dtype="float32", saved_dtype="float32", target="local", seconds=1.0)
    assert from_store(result, str(tmp_path / "store"), made, lambda r: False) is result  # as before: no relocation


def test_a_result_made_on_another_host_points_into_this_hosts_folder(tmp_path):
    there, here = Path("/hosts/a/cache/stores/5e7"), tmp_path / "stores" / "5e7"
    result = PublishResult(model_dir=str(there / "publish" / "abc" / "model"), files={"model.safetensors": "00"},
                           gguf_file=str(there / "publish" / "abc" / "model" / "model.gguf"), hub_repo="org/abc",
                           max_logit_diff=0.0, merge_dtype="float32", saved_dtype="float32", target="local", seconds=1.0)
    moved = relocated(result, here / "publish" / "abc")
    assert moved.model_dir == str(here / "publish" / "abc" / "model")
    assert moved.gguf_file == str(here / "publish" / "abc" / "model" / "model.gguf")
    assert moved.hub_repo == "org/abc" and moved.files == result.files
    assert relocated(moved, here / "publish" / "abc") == moved  # already this host's


# ---- two workers, as on two hosts: the whole finetune flow on one shared s3:// store

@pytest.mark.slow
def test_two_hosts_share_an_s3_store_one_trains_evaluates_and_publishes(prefect_api, bucket, tmp_path):
    """Worker A is frozen while it holds the train lease; worker B, started then, waits for it. When A goes on, B takes
    A's adapter, evaluation and published model from the cache, with each folder fetched into its own loraflow cache:
    one adapter trained, one evaluation, one numbered version."""
    from prefect.settings import PREFECT_API_URL

    from tests.tiny_llama import build_tiny_llama

    tiny_llama = build_tiny_llama(tmp_path / "tiny-llama")  # each host gets its own copy (start_worker)
    shared = tmp_path / "shared"
    shared.mkdir()
    config = tiny_config(shared, "~/base-model", store=f"s3://{bucket.name}/team/store", runs_dir="~/runs",
                         extra="locks: {backend: object-store, lease_seconds: 600}")
    api_url = PREFECT_API_URL.value()
    a, b, lock_key, waited = one_waits_for_the_other(tmp_path, config, api_url, tiny_llama, bucket, "team/store",
                                                     script=FINETUNE, stage="train")
    assert (a["train"]["cached"], b["train"]["cached"]) == (False, True)  # one adapter trained, by A
    assert a["train"]["fingerprint"] == b["train"]["fingerprint"]
    assert (a["eval"]["cached"], b["eval"]["cached"]) == (False, True) and a["eval"]["finetuned"] == b["eval"]["finetuned"]
    assert (a["publish"]["published"], a["publish"]["version"]) == (True, 1)
    assert b["publish"]["reused"] and not b["publish"]["published"] and b["publish"]["version"] is None
    # B's folders are its own, in its own cache, with A's files: fetched from the store, not read from A's disk
    for path_of in (lambda s: s["train"]["adapter_dir"], lambda s: s["eval"]["report"], lambda s: s["publish"]["model_dir"]):
        assert Path(path_of(a)).is_relative_to(tmp_path / "host-a" / "cache")
        assert Path(path_of(b)).is_relative_to(tmp_path / "host-b" / "cache"), path_of(b)
    adapter_a, adapter_b = Path(a["train"]["adapter_dir"]), Path(b["train"]["adapter_dir"])
    assert file_hashes(adapter_b) == file_hashes(adapter_a) and (adapter_b / "loraflow-adapter.json").exists()
    assert json.loads((adapter_b / "loraflow-adapter.json").read_text())["fingerprint"] == b["train"]["fingerprint"]
    assert file_hashes(Path(b["eval"]["report"]).parent) == file_hashes(Path(a["eval"]["report"]).parent)
    assert file_hashes(Path(b["publish"]["model_dir"])) == file_hashes(Path(a["publish"]["model_dir"]))
    assert (Path(b["run_dir"]) / "model" / "model.safetensors").exists()  # B's run folder links B's copy
    assert keys(bucket, "team/store/published/tiny/versions/") == ["team/store/published/tiny/versions/0001.json"]
    assert not list((tmp_path / "host-a" / "cache").rglob("published"))  # the registry is the bucket's, not a host's
    assert held_stage_lock(bucket, "team/store") is None  # every lease released

    # B's next run (another adapter: one more step) is gated against A's champion, its model fetched from the store,
    # and becomes version 2 of the one registry
    (shared / "next.yaml").write_text(config.read_text()
                                      .replace("max_steps: 2", "max_steps: 3")
                                      .replace("gate: {", "gate: {previous_tolerance: 1.0, previous_loss_tolerance: 100, "))
    worker_b, log_b = start_worker(tmp_path / "host-b", shared / "next.yaml", api_url, tiny_llama, script=FINETUNE)
    try:
        nxt = summary_of(worker_b, log_b)
    finally:
        worker_b.kill()
        worker_b.wait()
    assert not nxt["train"]["cached"] and nxt["eval"]["previous"] is not None  # compared with the champion
    assert Path(nxt["eval"]["previous_model_dir"]) == Path(b["publish"]["model_dir"])  # B's copy of A's version 1
    assert (nxt["publish"]["published"], nxt["publish"]["version"]) == (True, 2)
    champion = json.loads(bucket.client.get_object(Bucket=bucket.name, Key="team/store/published/tiny.json")["Body"].read())
    assert champion["version"] == 2 and champion["champion_since"]["from_version"] == 1
    assert champion["model_url"] == f"s3://{bucket.name}/team/store/folders/publish/{Path(nxt['publish']['model_dir']).parent.name}/model"
