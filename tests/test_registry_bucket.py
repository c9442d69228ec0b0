"""The version registry of an s3:// store lives in the bucket (loraflow.publishing.bucket_registry), against moto's S3
server on a loopback port: hosts (processes with their own loraflow cache, or registries with their own local folder)
that publish the same model name at once get distinct numbers and lose nothing; a champion moved on one host is the
champion on the other, through the real `loraflow` CLI; and another host's gate and `train.init_from: champion` find
the champion's model, fetched from the store into their own folder."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loraflow.cli.commands import main
from loraflow.config.train import TrainConfig
from loraflow.publishing.bucket_registry import BucketRegistry
from loraflow.publishing.champion_start import adapter_sha256, champion_start
from loraflow.publishing.merge import MODEL_MANIFEST
from loraflow.publishing.registry import RegistryError, model_dir_here, open_registry
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.store_folders import ship_folder, store_url
from tests.test_continue_from_champion import CHAMPION_DATA
from tests.test_store_s3 import bucket, keys, s3_endpoint  # noqa: F401  (fixtures: a moto S3 server and a bucket)

REPO = Path(__file__).resolve().parent.parent

PUBLISHER = """
import json, sys, time
from pathlib import Path
from loraflow.publishing.registry import open_registry
store, local, go, count = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
registry = open_registry(store, local)
while not go.exists():  # both hosts start publishing together
    time.sleep(0.01)
print(json.dumps([registry.add_version("anime", {"host": local.name, "i": i}) for i in range(count)]), flush=True)
"""


def test_an_s3_store_gets_a_bucket_registry_a_folder_store_keeps_its_own(bucket, tmp_path):
    registry = open_registry(f"s3://{bucket.name}/team/store", tmp_path / "host-a")
    assert isinstance(registry, BucketRegistry) and registry.where == f"s3://{bucket.name}/team/store/published"
    registry.add_version("anime", {"model_dir": "/x"})
    assert keys(bucket, "team/store/published/") == ["team/store/published/anime/versions/0001.json"]
    assert not (tmp_path / "host-a").exists()  # nothing of the registry on the host
    assert open_registry(str(tmp_path / "store"), tmp_path / "store").where == str(tmp_path / "store" / "published")


def test_two_hosts_publishing_at_once_get_distinct_numbers_and_lose_nothing(bucket, tmp_path):
    """Two processes, each with its own folder (as on two hosts), add 6 versions each at the same moment."""
    store, go = f"s3://{bucket.name}/team/store", tmp_path / "go"
    hosts = [subprocess.Popen([sys.executable, "-c", PUBLISHER, store, str(tmp_path / host), str(go), "6"], cwd=REPO,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for host in ("host-a", "host-b")]
    go.touch()
    numbers = []
    for host in hosts:
        out, err = host.communicate(timeout=300)
        assert host.returncode == 0, err[-3000:]
        numbers.append(json.loads(out))
    assert sorted(numbers[0] + numbers[1]) == list(range(1, 13))  # distinct, no gap
    held = BucketRegistry(store).versions("anime")
    assert [v["version"] for v in held] == list(range(1, 13))
    assert sorted((v["host"], v["i"]) for v in held) == sorted((h, i) for h in ("host-a", "host-b") for i in range(6))
    for host, taken in zip(("host-a", "host-b"), numbers):  # each record is under the number its host was given
        assert [v["host"] for v in held if v["version"] in taken] == [host] * 6


def test_champion_moves_at_once_from_two_hosts_are_all_kept_in_order(bucket):
    """12 promotes at once, from two registries (two clients), each to another version: every move is in the history,
    each one from the champion the one before it set (a lost move would leave two moves from the same champion)."""
    store = f"s3://{bucket.name}/team/store"
    host_a, host_b = BucketRegistry(store), BucketRegistry(store)
    for index in range(12):
        host_a.add_version("anime", {"model_dir": f"/models/{index + 1}"})
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda n: (host_a if n % 2 else host_b).move_champion("anime", n, action="promote", why=f"#{n}",
                                                                            by="test"), range(1, 13)))
    moves = host_b.history("anime")
    assert sorted(entry["version"] for entry in moves) == list(range(1, 13))
    after = {entry["from_version"]: entry["version"] for entry in moves}
    assert len(after) == 12  # no two moves from the same champion
    chain, version = [], None
    while version in after:
        version = after[version]
        chain.append(version)
    assert len(chain) == 12 and host_a.champion("anime")["version"] == chain[-1]
    assert host_a.champion("anime")["champion_since"]["why"] == f"#{chain[-1]}"


def test_host_b_sees_host_a_champion_and_host_a_sees_b_promote_and_rollback(bucket, tmp_path, monkeypatch, capsys):
    """Host A publishes (the registry, as the flow does); host B lists, promotes and rolls back with the CLI, with its
    own loraflow cache; A's registry sees every move."""
    store = f"s3://{bucket.name}/team/store"
    host_a = open_registry(store, tmp_path / "host-a")
    for index in range(3):
        number = host_a.add_version("anime", {"model_dir": f"/host-a/models/{index + 1}", "published_at": 1.8e9 + index,
                                              "metrics": {"fact_accuracy": 0.5 + index / 10}})
        host_a.move_champion("anime", number, action="publish", why="passed the gate", by="gate")
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "host-b" / "cache"))
    assert main(["models", "anime", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert [line.split()[0] for line in listing.splitlines()[1:4]] == ["1", "2", "*"] and "champion: version 3" in listing

    assert main(["rollback", "anime", "--why", "answers got worse", "--by", "bo", "--store", store]) == 0
    assert host_a.champion("anime")["version"] == 2
    assert main(["promote", "anime", "3", "--why", "fixed upstream", "--by", "bo", "--store", store]) == 0
    assert host_a.champion("anime")["version"] == 3 and host_a.champion("anime")["champion_since"]["why"] == "fixed upstream"
    assert [(h["action"], h["version"], h["from_version"], h["by"]) for h in host_a.history("anime")][3:] == [
        ("rollback", 2, 3, "bo"), ("promote", 3, 2, "bo")]
    assert host_a.rollback_target("anime") == 2
    assert main(["promote", "anime", "9", "--why", "x", "--store", store]) == 2
    assert f"no version 9 in s3://{bucket.name}/team/store/published (versions: [1, 2, 3])" in capsys.readouterr().err
    assert not list((tmp_path / "host-b").rglob("*.json"))  # nothing of the registry on B's disk
    with pytest.raises(RegistryError, match="nothing published"):
        host_a.rollback_target("tea")


def published_model(local_root: Path) -> Path:
    """A publish folder as the publish stage leaves it (merged model, its manifest, the adapter), shipped."""
    model = local_root / "publish" / "0a1b2c" / "model"
    (model / "adapter").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(os.urandom(1024))
    (model / MODEL_MANIFEST).write_text('{"files": {}}')
    (model / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(512))
    (model / "adapter" / "adapter_config.json").write_text('{"r": 16}')
    return model


def test_host_b_gate_and_init_from_find_host_a_champion_fetched_from_the_store(bucket, tmp_path, monkeypatch):
    from flows.finetune import champion_to_beat
    from loraflow.runtime.stage_task import local_root

    store = f"s3://{bucket.name}/team/store"
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "host-a" / "cache"))
    root_a = local_root(store)
    model_a = published_model(root_a)
    ship_folder(store, model_a.parent)
    artifacts = ArtifactStore(store)
    tokens = artifacts.write(CHAMPION_DATA, stage="tokenize", contract="tokens", schema_version=2, config_hash="c")
    registry_a = open_registry(store, root_a)
    number = registry_a.add_version("anime", {
        "model_dir": str(model_a), "model_url": store_url(store, root_a, model_a), "adapter_fingerprint": "f-a",
        "data": {"tokens_sha256": tokens.sha256}, "config": {"train": TrainConfig().model_dump(mode="json")}})
    registry_a.move_champion("anime", number, action="publish", why="passed the gate", by="gate")
    assert registry_a.champion("anime")["model_url"] == f"{store}/folders/publish/0a1b2c/model"

    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "host-b" / "cache"))
    root_b = local_root(store)
    previous = champion_to_beat(store, "anime", exclude_fingerprint="f-b")  # B's gate compares with A's champion
    assert previous["version"] == 1 and Path(previous["model_dir"]) == root_b / "publish" / "0a1b2c" / "model"
    assert (Path(previous["model_dir"]) / "model.safetensors").read_bytes() == (model_a / "model.safetensors").read_bytes()
    assert champion_to_beat(store, "anime", exclude_fingerprint="f-a") is None  # the champion's own adapter

    start, why_fresh = champion_start(open_registry(store, root_b), artifacts, "anime",
                                      TrainConfig(init_from="champion"), "other data", root_b)
    assert why_fresh is None and start.version == 1 and start.tokens == tokens
    assert Path(start.adapter_dir).is_relative_to(root_b) and start.adapter_sha256 == adapter_sha256(model_a / "adapter")

    gone = {**registry_a.champion("anime"), "model_url": f"{store}/folders/publish/never-shipped/model"}
    assert not model_dir_here(gone, store, tmp_path / "host-c").exists()  # nothing in the store: nothing to compare


def test_host_b_asks_host_a_champion_by_name(bucket, tmp_path, monkeypatch, capsys):
    """`loraflow ask NAME --store s3://...` on host B answers with A's champion, fetched into B's own folder (the
    model's answer itself is stubbed, as in tests/test_run_folder.py)."""
    from loraflow.runtime.stage_task import local_root

    store = f"s3://{bucket.name}/team/store"
    assert main(["ask", "anime", "hi", "--store", store]) == 2 and "nothing published" in capsys.readouterr().err
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "host-a" / "cache"))
    root_a = local_root(store)
    model_a = published_model(root_a)
    registry_a = open_registry(store, root_a)
    registry_a.add_version("anime", {"model_dir": str(model_a), "model_url": store_url(store, root_a, model_a)})
    registry_a.move_champion("anime", 1, action="publish", why="passed the gate", by="gate")

    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "host-b" / "cache"))
    asked = []
    monkeypatch.setattr("loraflow.modeling.inference.ask", lambda folder, question, **kwargs: asked.append(folder) or iter(["ok"]))
    assert main(["ask", "anime", "hi", "--store", store]) == 2  # not shipped yet: said, with the fix
    assert "its model folder is not in" in capsys.readouterr().err and asked == []
    ship_folder(store, model_a.parent)
    assert main(["ask", "anime", "hi", "--store", store]) == 0 and capsys.readouterr().out == "ok\n"
    assert asked == [local_root(store) / "publish" / "0a1b2c" / "model"]
    assert (asked[0] / "model.safetensors").read_bytes() == (model_a / "model.safetensors").read_bytes()
