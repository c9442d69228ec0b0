"""The content-addressed artifact store: atomic writes, verified reads, corruption detected."""

import os

import pandas as pd
import pytest

from loraflow.runtime.artifact_store import ArtifactStore, CorruptArtifact


@pytest.fixture
def frame():
    return pd.DataFrame({"id": ["a", "b"], "ids": [[1, 2], [3]], "messages": [[{"role": "user", "content": "hi"}], []]})


def write(store, frame):
    return store.write(frame, stage="test", contract="c", schema_version=1, config_hash="h")


def test_round_trip_and_content_address(tmp_path, frame):
    store = ArtifactStore(tmp_path)
    ref = write(store, frame)
    assert ref.rows == 2 and ref.uri.endswith(f"{ref.sha256}.parquet")
    assert write(store, frame).sha256 == ref.sha256  # same rows -> same bytes -> same address
    back = store.read(ref)
    assert list(back["id"]) == ["a", "b"] and list(back["ids"][0]) == [1, 2]
    assert back["messages"][0][0]["content"] == "hi"
    assert not [name for name in os.listdir(os.path.dirname(ref.uri)) if name.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_damaged_artifact_is_detected(tmp_path, frame, damage):
    store = ArtifactStore(tmp_path)
    ref = write(store, frame)
    if damage == "truncate":
        with open(ref.uri, "r+b") as handle:
            handle.truncate(os.path.getsize(ref.uri) // 2)
    elif damage == "flip":
        data = bytearray(open(ref.uri, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(ref.uri, "wb").write(bytes(data))
    elif damage == "delete":
        os.unlink(ref.uri)
    else:
        os.unlink(ref.uri.replace(".parquet", ".manifest.json"))
    assert not store.is_valid(ref)
    with pytest.raises(CorruptArtifact, match=ref.sha256[:12] if damage in ("truncate", "flip") else "."):
        store.read(ref)


def test_fsspec_memory_store(frame):
    store = ArtifactStore("memory://loraflow-test-store")
    ref = write(store, frame)
    assert ref.uri.startswith("memory://")
    assert store.read(ref)["id"].tolist() == ["a", "b"]


@pytest.mark.parametrize("url", ["s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix", "sftp://deploy:hunter2@host/store"])
def test_credentials_in_a_store_url_are_refused(url):
    """The store URL is a flow parameter and a summary line: a key or password in it is refused, unshown."""
    with pytest.raises(ValueError, match="credentials in the URL are refused") as refused:
        ArtifactStore(url)
    assert "wJalrXUtnFEMI" not in str(refused.value) and "hunter2" not in str(refused.value)
