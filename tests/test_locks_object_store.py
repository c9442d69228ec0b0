"""Stage locks that hold across hosts (locks.backend: object-store): lease objects in a real S3 API (moto's server on a
loopback port), held by real processes. A live holder's renewed lease keeps waiters out; a killed holder's lease runs
out and is taken over with If-Match; a holder that stalled past its lease loses the lock and says so; and two workers
that share only the bucket (their own HOME, Prefect home and loraflow cache, as on two hosts) run the prepare flow at
once: each stage is computed by one of them, and the other waits and reuses its artifacts."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraflow.config.locks import LockConfig
from loraflow.config.pipeline import ConfigError, load_config
from tests.test_store_s3 import bucket, keys, s3_endpoint  # noqa: F401  (fixtures: a moto S3 server and a bucket)
from tests.two_hosts import held_stage_lock, one_waits_for_the_other

from loraflow.runtime.object_store_locks import LockStoreError, ObjectStoreLockManager  # noqa: E402
from loraflow.runtime.stage_locks import LockWaitTimeout  # noqa: E402
from loraflow.runtime.stage_task import host_lock_manager, run_locked, shared_lock_manager  # noqa: E402
from prefect import flow, task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LEASE = 3.0  # short, so expiry shows in seconds; S3's clock (Date, Last-Modified) counts whole seconds

HOLD = """
import sys, time
from loraflow.runtime.object_store_locks import ObjectStoreLockManager
store, lease, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
manager = ObjectStoreLockManager(store, lease_seconds=lease, host="host-a")
manager.acquire_lock("train-abc", holder="holder-in-child")
print("LOCKED", flush=True)
time.sleep(hold)
try:
    manager.release_lock("train-abc", holder="holder-in-child")
    print("RELEASED", flush=True)
except ValueError as error:
    print("LOST", error, flush=True)
"""


def hold_lock(store: str, *, hold: float, lease: float = LEASE) -> subprocess.Popen:
    """A child process (as on another host) that takes `train-abc` in `store`, says LOCKED and holds it `hold` s."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, store, str(lease), str(hold)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "LOCKED", child.stderr.read()[-2000:]
    return child


def lock_object(bucket, store_prefix: str) -> dict | None:
    listed = [key for key in keys(bucket, f"{store_prefix}/locks/") if key.endswith("train-abc.lock")]
    if not listed:
        return None
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=listed[0])["Body"].read())


@pytest.fixture
def lock_log(caplog):
    caplog.set_level(logging.INFO, logger="loraflow.runtime.stage_locks")
    return caplog


def test_lease_object_is_created_renewed_and_released(bucket):
    store = f"s3://{bucket.name}/team/store"
    manager = ObjectStoreLockManager(store, lease_seconds=LEASE, host="host-a")
    assert manager.acquire_lock("train-abc", holder="me")
    first = lock_object(bucket, "team/store")
    assert first["holder"] == "me" and first["host"] == "host-a" and first["pid"] == os.getpid()
    assert first["lease_seconds"] == LEASE
    assert manager.is_locked("train-abc") and manager.is_lock_holder("train-abc", "me")
    assert not manager.is_lock_holder("train-abc", "someone-else")
    time.sleep(LEASE * 1.5)  # two renewals
    renewed = lock_object(bucket, "team/store")
    assert renewed["since"] == first["since"] and renewed["expiration"] > first["expiration"]
    assert manager.is_locked("train-abc")  # renewed: not expired though older than the lease
    manager.release_lock("train-abc", holder="me")
    assert lock_object(bucket, "team/store") is None
    assert not [key for key in keys(bucket, "team/store/locks/")]  # the conditional-write probe is gone too
    with pytest.raises(ValueError, match="No lock held by me"):
        manager.release_lock("train-abc", holder="me")


def test_live_holder_on_another_host_is_waited_for_then_past_the_bound_a_clear_error(bucket, lock_log):
    store = f"s3://{bucket.name}/live"
    child = hold_lock(store, hold=LEASE * 3)
    try:
        waiter = ObjectStoreLockManager(store, lease_seconds=LEASE, wait_seconds=LEASE * 1.5, poll_seconds=0.2)
        with pytest.raises(LockWaitTimeout) as error:
            waiter.acquire_lock("train-abc", holder="waiter")  # waits longer than the lease: renewals keep it
        message = str(error.value)
        assert f"s3://{bucket.name}/live/locks/train-abc.lock" in message and "host-a" in message
        assert "locks.wait_seconds" in message
        waits = [r.getMessage() for r in lock_log.records if "waiting for lock" in r.getMessage()]
        assert waits and "host-a" in waits[0] and f"pid {child.pid}" in waits[0]
        assert not [r for r in lock_log.records if "taking over" in r.getMessage()]
        # once the holder releases, the waiter gets the lock without any takeover
        assert waiter.acquire_lock("train-abc", holder="waiter", acquire_timeout=LEASE * 4)
        assert child.wait(timeout=30) == 0 and child.stdout.read().strip() == "RELEASED"
        assert lock_object(bucket, "live")["holder"] == "waiter"
        waiter.release_lock("train-abc", holder="waiter")
    finally:
        child.kill()
        child.wait()


def test_killed_holders_lease_runs_out_and_is_taken_over(bucket, lock_log):
    store = f"s3://{bucket.name}/killed"
    child = hold_lock(store, hold=600)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert lock_object(bucket, "killed")["pid"] == child.pid  # what a dead host leaves behind
    waiter = ObjectStoreLockManager(store, lease_seconds=LEASE, wait_seconds=30, poll_seconds=0.2)
    started = time.monotonic()
    assert waiter.acquire_lock("train-abc", holder="waiter")
    assert LEASE - 1.5 < time.monotonic() - started < LEASE + 10  # not before its lease ran out
    assert lock_object(bucket, "killed")["holder"] == "waiter"
    taken = [r.getMessage() for r in lock_log.records if r.levelno == logging.WARNING and "taking over" in r.getMessage()]
    assert len(taken) == 1 and f"pid {child.pid}" in taken[0] and "host-a" in taken[0]
    waiter.release_lock("train-abc", holder="waiter")


def test_takeover_judged_on_a_stale_read_fails(bucket):
    """Two waiters that both judged the same expired lease: the If-Match of the second names an ETag that is gone."""
    store = f"s3://{bucket.name}/race"
    holder = ObjectStoreLockManager(store, lease_seconds=LEASE)
    holder.acquire_lock("train-abc", holder="first")
    judged = holder.read("train-abc")
    other = ObjectStoreLockManager(store, lease_seconds=LEASE)
    assert other._put("train-abc", {"holder": "second"}, IfMatch=judged.etag) is not None  # the first takeover wins
    assert other._put("train-abc", {"holder": "third"}, IfMatch=judged.etag) is None  # the second is refused
    assert lock_object(bucket, "race")["holder"] == "second"
    with pytest.raises(ValueError, match="taken over"):
        holder.release_lock("train-abc", holder="first")
    assert lock_object(bucket, "race")["holder"] == "second"  # a lost holder never deletes the new holder's lock


def test_holder_stalled_past_its_lease_loses_the_lock_and_says_so(bucket):
    store = f"s3://{bucket.name}/stalled"
    child = hold_lock(store, hold=LEASE * 3)
    os.kill(child.pid, signal.SIGSTOP)  # a host that froze (GC pause, network partition) past its lease
    try:
        waiter = ObjectStoreLockManager(store, lease_seconds=LEASE, wait_seconds=30, poll_seconds=0.2)
        assert waiter.acquire_lock("train-abc", holder="waiter")
    finally:
        os.kill(child.pid, signal.SIGCONT)
    out, err = child.communicate(timeout=60)
    assert out.startswith("LOST") and "taken over" in out
    assert "lost lock" in err and "train-abc.lock" in err  # its renewal found the ETag changed
    assert lock_object(bucket, "stalled")["holder"] == "waiter"
    waiter.release_lock("train-abc", holder="waiter")


def test_lock_config_is_decided_once(bucket, tmp_path):
    store = f"s3://{bucket.name}/config"
    assert isinstance(shared_lock_manager(LockConfig(backend="object-store"), store), ObjectStoreLockManager)
    assert shared_lock_manager(LockConfig(), store) is None  # local: the data stages run unlocked, as before
    # train/evaluate/publish write folders on this host: their locks stay there whatever the backend
    assert host_lock_manager(LockConfig(backend="object-store", wait_seconds=5), store).wait_seconds == 5
    (tmp_path / "config.yaml").write_text("name: x\nstore: ./store\nlocks: {backend: object-store}\n"
                                          "sources:\n  - {kind: csv, path: a.csv}\n")
    with pytest.raises(ConfigError, match="object-store keeps its leases in an s3:// store"):
        load_config(tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="locks.redis_url"):
        LockConfig(backend="redis")


def test_a_bucket_that_cannot_be_reached_is_named_with_the_fix(bucket):
    manager = ObjectStoreLockManager(f"s3://{bucket.name}-missing/store", lease_seconds=LEASE)
    with pytest.raises(LockStoreError, match=f"{bucket.name}-missing.*AWS_ENDPOINT_URL"):
        manager.acquire_lock("train-abc", holder="me")


@task(name="s3-lease-locked-square")
def locked_square(value: int) -> int:
    return value * value


@flow(name="s3-lease-locked-twice")
def locked_twice(store_root: str) -> list:
    locks = shared_lock_manager(LockConfig(backend="object-store"), store_root)  # as the prepare flow decides it
    return [run_locked(locked_square, store_root, lambda result: True, lock_manager=locks, value=3) for _ in range(2)]


def test_run_locked_takes_and_releases_the_lease_through_prefects_transaction(prefect_api, bucket, tmp_path,
                                                                              monkeypatch):
    """run_locked with the object-store lock manager: computed once, then a cache hit; each call took and released a
    lease in the bucket (Prefect's transaction asked the manager), no lock file on this host."""
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "cache"))
    requests = []
    import botocore.client

    original = botocore.client.BaseClient._make_api_call

    def counted(client, operation, params):
        if str(params.get("Key", "")).startswith("leased/locks/s3-lease-locked-square-"):
            requests.append(operation)
        return original(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)
    assert locked_twice(f"s3://{bucket.name}/leased") == [(9, False), (9, True)]
    assert requests.count("PutObject") == 2 and requests.count("DeleteObject") == 2  # taken and released, twice
    assert held_stage_lock(bucket, "leased") is None
    assert not (tmp_path / "cache" / "stores").exists()


# ---- two workers, as on two hosts: the real prepare flow on one shared s3:// store

@pytest.mark.slow
def test_two_hosts_share_an_s3_store_each_stage_computed_once(prefect_api, bucket, model_dir, tmp_path):
    """Worker A is frozen while it holds a stage's lease; worker B, started then, computes nothing A did: it waits
    for that lease, and every stage of the two runs was computed by exactly one of them, with the same artifacts."""
    import pandas as pd
    from prefect.settings import PREFECT_API_URL

    from tests.test_prepare_flow import CATALOG

    shared = tmp_path / "shared"  # the config and its source, as both hosts would read them (same path, same bytes)
    shared.mkdir()
    pd.read_csv(CATALOG, dtype=str, keep_default_na=False).head(12).to_csv(shared / "catalog.csv", index=False)
    (shared / "config.yaml").write_text(
        f"name: two-hosts\nstore: s3://{bucket.name}/team/store\nruns_dir: {shared / 'runs'}\n"
        "locks: {backend: object-store, lease_seconds: 600}\n"  # A is frozen (no renewals) while B starts
        "model: {base: ~/base-model}\n"  # each host's own copy, in a folder of its own: the same tokenizer files
        "sources:\n  - {kind: csv, name: catalog, path: catalog.csv}\n"
        "synthesize: {kind: anime_qa}\n"
        "format: {template: chat_template, system_prompt: 'You are an anime catalog assistant.'}\n"
        "tokenize: {max_length: 384, validation_fraction: 0.2}\n")
    a, b, lock_key, waited = one_waits_for_the_other(tmp_path, shared / "config.yaml", PREFECT_API_URL.value(), model_dir,
                                                     bucket, "team/store")
    assert "held by pid" in waited
    assert a["stages"].keys() == b["stages"].keys() and len(a["stages"]) >= 4
    computed_by = {name: [run for run, summary in (("a", a), ("b", b)) if not summary["stages"][name]["cached"]]
                   for name in a["stages"]}
    assert all(len(runs) == 1 for runs in computed_by.values()), computed_by  # each stage computed exactly once
    held_stage = lock_key.rsplit("/", 1)[-1].split("-")[0]  # `ingest-<hash>.lock` -> ingest
    assert computed_by[next(name for name in a["stages"] if name.split(":")[0] == held_stage)] == ["a"]
    for name in a["stages"]:
        assert a["stages"][name]["sha256"] == b["stages"][name]["sha256"], name
    assert a["tokens"]["sha256"] == b["tokens"]["sha256"]
    assert a["model_dir"] != b["model_dir"]  # a tokenizer folder of each host's own, and still computed once
    assert held_stage_lock(bucket, "team/store") is None  # every lease released
