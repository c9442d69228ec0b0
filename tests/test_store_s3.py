"""Artifact and result storage on S3: the store and the real prepare flow against a local S3-compatible server.

moto's server mode answers the S3 API on a loopback port; s3fs (fsspec's S3 backend) and Prefect's
`RemoteFileSystem` reach it through AWS_ENDPOINT_URL, exactly as they would reach AWS or MinIO. The bucket is
inspected with a separate boto3 client, so what the tests see is what is really in the bucket.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from loraflow.runtime.cache_keys import STAGE_CACHE  # noqa: E402
from loraflow.runtime.artifact_store import ArtifactStore, CorruptArtifact  # noqa: E402
from loraflow.runtime.stage_task import local_root, run_locked  # noqa: E402
from tests.test_prepare_flow import run_prepare, write_prepare_config  # noqa: E402
from prefect import flow, task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECRET = f"loraflow-test-secret-{uuid.uuid4().hex}"  # a sentinel: must never show up in anything loraflow writes


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 and a free port, for this module."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; credentials and endpoint only in the environment, as a worker would have them."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "loraflow-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    s3fs.S3FileSystem.clear_instance_cache()  # no client made with another test's environment
    name = f"loraflow-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield SimpleNamespace(name=name, client=client, endpoint=s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()


def keys(bucket, prefix: str) -> list[str]:
    listing = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def object_bytes(bucket, uri: str) -> bytes:
    return bucket.client.get_object(Bucket=bucket.name, Key=key_of(bucket, uri))["Body"].read()


def key_of(bucket, uri: str) -> str:
    prefix = f"s3://{bucket.name}/"
    assert uri.startswith(prefix), uri
    return uri[len(prefix):]


# ---- the store alone


def test_store_round_trip_and_damage_on_s3(bucket):
    import pandas as pd

    store = ArtifactStore(f"s3://{bucket.name}/unit")
    ref = store.write(pd.DataFrame({"id": ["a", "b"], "ids": [[1, 2], [3]]}), stage="test", contract="c",
                      schema_version=1, config_hash="h")
    assert ref.uri == f"s3://{bucket.name}/unit/artifacts/test/{ref.sha256}.parquet"
    assert keys(bucket, "unit/") == [f"unit/artifacts/test/{ref.sha256}.manifest.json",
                                     f"unit/artifacts/test/{ref.sha256}.parquet"]
    assert hashlib.sha256(object_bytes(bucket, ref.uri)).hexdigest() == ref.sha256
    assert store.read(ref)["id"].tolist() == ["a", "b"]

    # Another writer (or a bad copy) replaces the object: the hash check refuses it.
    damaged = bytearray(object_bytes(bucket, ref.uri))
    damaged[len(damaged) // 2] ^= 0x01
    bucket.client.put_object(Bucket=bucket.name, Key=key_of(bucket, ref.uri), Body=bytes(damaged))
    assert not store.is_valid(ref)
    with pytest.raises(CorruptArtifact, match=ref.sha256[:12]):
        store.read(ref)

    # A data object without its manifest (a writer that died between the two PUTs) is never used.
    bucket.client.delete_object(Bucket=bucket.name, Key=key_of(bucket, ref.uri)[: -len(".parquet")] + ".manifest.json")
    with pytest.raises(CorruptArtifact, match="no manifest"):
        store.read(ref)


def test_cache_key_is_none_when_an_input_object_is_gone(bucket):
    """The stage cache policy asks the bucket whether an input artifact exists: a deleted object means no cache hit."""
    import pandas as pd

    from tasks.format import format_task

    store = ArtifactStore(f"s3://{bucket.name}/keys")
    ref = store.write(pd.DataFrame({"id": ["a"]}), stage="synthesize", contract="c", schema_version=1, config_hash="h")
    context = SimpleNamespace(task=format_task)
    parameters = {"conversations_ref": ref, "store_root": store.root}
    key = STAGE_CACHE.compute_key(context, parameters, {})
    assert key and key.startswith("format-")
    assert STAGE_CACHE.compute_key(context, parameters, {}) == key  # stable
    bucket.client.delete_object(Bucket=bucket.name, Key=key_of(bucket, ref.uri))
    assert STAGE_CACHE.compute_key(context, parameters, {}) is None


def test_endpoint_from_fsspec_config_variable(bucket, monkeypatch):
    """FSSPEC_S3_ENDPOINT_URL (fsspec's own config, read when fsspec is imported) works instead of
    AWS_ENDPOINT_URL: a fresh process writes and reads an artifact with only that variable set."""
    env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": bucket.endpoint}
    env.pop("AWS_ENDPOINT_URL")
    script = (
        "import pandas as pd\n"
        "from loraflow.runtime.artifact_store import ArtifactStore\n"
        f"store = ArtifactStore('s3://{bucket.name}/fsspec-config')\n"
        "ref = store.write(pd.DataFrame({'id': ['x']}), stage='t', contract='c', schema_version=1, config_hash='h')\n"
        "print(ref.uri, store.read(ref)['id'].tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "['x']" in done.stdout
    assert len(keys(bucket, "fsspec-config/artifacts/t/")) == 2  # the Parquet object and its manifest


@task(name="s3-locked-square")
def locked_square(value: int) -> int:
    return value * value


@flow(name="s3-locked-twice")
def locked_twice(store_root: str) -> list:
    return [run_locked(locked_square, store_root, lambda result: True, value=3) for _ in range(2)]


def test_run_locked_on_a_url_store(prefect_api, bucket, tmp_path, monkeypatch):
    """The train/evaluate/publish wrapper: results in the bucket (the second call is a cache hit), lock files in
    this host's loraflow cache, nothing in a folder named after the URL."""
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert locked_twice(f"s3://{bucket.name}/locked") == [(9, False), (9, True)]
    assert [key for key in keys(bucket, "locked/") if key.startswith("locked/prefect-results/s3-locked-square-")]
    assert local_root(f"s3://{bucket.name}/locked").is_relative_to(tmp_path / "cache" / "stores")
    assert (local_root(f"s3://{bucket.name}/locked") / "locks").is_dir()
    assert not Path("s3:").exists()


# ---- the real prepare flow with `store: s3://...`


@pytest.fixture
def s3_config(tmp_path, bucket):
    return write_prepare_config(tmp_path, name="s3-test", store=f"s3://{bucket.name}/team/store", catalog_rows=8)


def test_prepare_flow_on_s3_caches_and_recomputes_a_corrupt_object(prefect_api, bucket, s3_config, monkeypatch):
    monkeypatch.chdir(s3_config.parent)  # a URL mistaken for a path would show up here as an `s3:` folder
    first = run_prepare(s3_config)
    stages = first["stages"]
    assert set(stages) == {"ingest:catalog", "synthesize", "format", "tokenize"}
    assert not any(stage["cached"] for stage in stages.values())
    in_bucket = keys(bucket, "team/store/")
    for name, stage in stages.items():
        uri = stage["artifact"]
        assert uri.startswith(f"s3://{bucket.name}/team/store/artifacts/"), (name, uri)
        assert hashlib.sha256(object_bytes(bucket, uri)).hexdigest() == stage["sha256"], name
        manifest = json.loads(object_bytes(bucket, uri[: -len(".parquet")] + ".manifest.json"))
        assert manifest["sha256"] == stage["sha256"] and manifest["rows"] == stage["rows_out"], name
    # Prefect's cached stage results live in the bucket too (one JSON record per stage), not on this disk.
    results = [key for key in in_bucket if key.startswith("team/store/prefect-results/")]
    assert len(results) >= len(stages), in_bucket
    assert {json.loads(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())["metadata"]["serializer"]["type"]
            for key in results} == {"json"}
    assert not list(s3_config.parent.glob("s3*")) and not Path("s3:").exists()
    assert first["preflight"]

    second = run_prepare(s3_config)
    assert all(stage["cached"] for stage in second["stages"].values()), second["stages"]
    assert second["tokens"]["sha256"] == first["tokens"]["sha256"]

    # Truncate the tokens object in the bucket: the cached result points at bad bytes, so tokenize re-runs
    # (its inputs unchanged, the upstream stages stay cached) and writes the whole object again.
    tokens_uri = first["stages"]["tokenize"]["artifact"]
    bucket.client.put_object(Bucket=bucket.name, Key=key_of(bucket, tokens_uri), Body=object_bytes(bucket, tokens_uri)[:100])
    third = run_prepare(s3_config)
    assert not third["stages"]["tokenize"]["cached"]
    assert all(third["stages"][name]["cached"] for name in ("ingest:catalog", "synthesize", "format"))
    assert third["tokens"]["sha256"] == first["tokens"]["sha256"]
    assert hashlib.sha256(object_bytes(bucket, tokens_uri)).hexdigest() == first["tokens"]["sha256"]

    # The secret key reached S3 only through the environment: not the bucket, the summary, Prefect's flow run
    # parameters or its block documents (the result-storage block holds the URL alone).
    from prefect.client.orchestration import get_client

    written = [object_bytes(bucket, f"s3://{bucket.name}/{key}") for key in keys(bucket, "team/")]
    written.append((Path(third["run_dir"]) / "summary.json").read_bytes())
    with get_client(sync_client=True) as client:
        blocks = client.read_block_documents(include_secrets=True)
        written.append(json.dumps([block.model_dump(mode="json") for block in blocks]).encode())
        written.append(json.dumps([run.parameters for run in client.read_flow_runs()], default=str).encode())
    assert any(f"s3://{bucket.name}/team/store/prefect-results".encode() in blob for blob in written[-2:-1])
    assert not [blob[:80] for blob in written if SECRET.encode() in blob]
