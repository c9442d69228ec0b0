"""Stage locks that hold across hosts: lease objects in the store's own bucket, written with S3 conditional puts.

`<store>/locks/<cache key>.lock` holds its holder's id, host and pid, when it took the lock, and its lease. It is
created with `If-None-Match: *` (of two racing PUTs, one succeeds), renewed every third of the lease with
`If-Match: <its ETag>` while the stage runs, and deleted with `If-Match` at the end. A waiter polls with backoff
and takes a lock over only once its lease ran out, judged on the bucket's clock (the response's Date minus the
object's Last-Modified, so the hosts' clocks never matter), with `If-Match` on the ETag it judged (of two waiters,
one wins). Prefect's SERIALIZABLE transaction then finds the holder's result, and the waiter reuses it.
"""

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import anyio
import fsspec
from prefect.locking.protocol import LockManager

from loraflow.runtime.stage_locks import LEASE_SECONDS, NOTICE_SECONDS, WAIT_SECONDS, describe, lock_logger, note_wait

# What S3 answers when a condition fails (412) or a concurrent conditional write won (409).
LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
MISSING = {"NoSuchKey", "404"}


class LockStoreError(RuntimeError):
    """The bucket refused or could not serve a lock request (credentials, endpoint, or no conditional writes)."""


@dataclass(frozen=True)
class Lease:
    """A lock object as read: its record, its ETag, and its age on the bucket's clock."""

    record: dict
    etag: str
    age_seconds: float

    def expired(self) -> bool:
        """Whether its holder stopped renewing it for longer than the lease it announced."""
        return self.age_seconds > float(self.record.get("lease_seconds", LEASE_SECONDS))


@dataclass
class HeldLock:
    """A lock this process holds: its holder id, the ETag of its last write, and its renewal thread's stop switch."""

    holder: str
    etag: str
    since: str
    stop: threading.Event = field(default_factory=threading.Event)
    mutex: threading.Lock = field(default_factory=threading.Lock)


def s3_location(store_root: str) -> tuple[str, str]:
    """(bucket, key prefix) of an `s3://bucket/prefix` store."""
    if not store_root.startswith("s3://"):
        raise ValueError(f"object-store locks need an s3:// store, got {store_root!r} -> use locks.backend: local")
    bucket, _, prefix = store_root.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def s3_client():
    """A boto3 S3 client that reaches the store as its fsspec backend does: the endpoint from fsspec's config
    (FSSPEC_S3_ENDPOINT_URL) or else AWS_ENDPOINT_URL, credentials from the environment."""
    import boto3

    options = fsspec.config.conf.get("s3", {})
    endpoint = options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
    return boto3.client("s3", endpoint_url=endpoint)  # None: boto3 reads AWS_ENDPOINT_URL itself


def error_code(error: Exception) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def put_object_if(client, bucket: str, key: str, body: bytes, **condition) -> str | None:
    """Write a JSON object under `condition` (IfNoneMatch='*' or IfMatch=<ETag>); its new ETag, or None when the
    condition failed (another writer came first, or the object it matched is gone); other errors are raised."""
    try:
        response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition)
    except Exception as error:
        if error_code(error) in LOST_RACE or (condition.get("IfMatch") and error_code(error) in MISSING):
            return None
        raise
    return response["ETag"]


class ObjectStoreLockManager(LockManager):
    """Prefect lock manager whose locks are lease objects next to the artifacts of an `s3://` store."""

    def __init__(self, store_root: str, *, lease_seconds: float = LEASE_SECONDS, wait_seconds: float | None = None,
                 notice_seconds: float = NOTICE_SECONDS, poll_seconds: float = 0.5, max_poll_seconds: float = 5.0,
                 host: str | None = None, client=None) -> None:
        self.bucket, self.prefix = s3_location(store_root)
        self.client = client or s3_client()
        self.lease_seconds = lease_seconds
        env_wait = os.environ.get("LORAFLOW_LOCK_WAIT_S")
        self.wait_seconds = wait_seconds if wait_seconds is not None else float(env_wait or WAIT_SECONDS)
        self.notice_seconds, self.poll_seconds, self.max_poll_seconds = notice_seconds, poll_seconds, max_poll_seconds
        self.host = host or socket.gethostname()
        self._held: dict[str, HeldLock] = {}
        self._conditional_writes_checked = False

    def __getstate__(self) -> dict:
        """Pickled without its client and held locks (a copy in another process holds none): they are rebuilt."""
        return {name: value for name, value in self.__dict__.items() if name not in ("client", "_held")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, client=s3_client(), _held={})

    # ---- the lock object

    def object_key(self, key: str) -> str:
        """The bucket key of the lock for transaction `key`."""
        return "/".join(part for part in (self.prefix, "locks", f"{key}.lock") if part)

    def where(self, key: str) -> str:
        """The lock's URL, for messages."""
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def _record(self, holder: str, since: str) -> dict:
        expiration = datetime.now(timezone.utc) + timedelta(seconds=self.lease_seconds)
        return {"holder": holder, "host": self.host, "pid": os.getpid(), "since": since,
                "lease_seconds": self.lease_seconds, "expiration": expiration.isoformat()}

    def _store_error(self, key: str, error: Exception) -> LockStoreError:
        return LockStoreError(
            f"lock {self.where(key)}: the bucket refused the request ({error_code(error) or type(error).__name__}: "
            f"{error}) -> check the worker's AWS credentials and endpoint (AWS_ENDPOINT_URL), or set locks.backend: "
            f"local")

    def _put(self, key: str, record: dict, **condition) -> str | None:
        """Write the lock object under `condition` (IfNoneMatch='*' or IfMatch=<ETag>); its new ETag, or None when
        the condition failed (someone else holds it, or took it over)."""
        try:
            return put_object_if(self.client, self.bucket, self.object_key(key), json.dumps(record).encode(), **condition)
        except Exception as error:
            raise self._store_error(key, error) from error

    def read(self, key: str) -> Lease | None:
        """The lock object for `key` as it is now, or None when nobody holds it."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as error:
            if error_code(error) in MISSING:
                return None
            raise self._store_error(key, error) from error
        try:
            record = json.loads(response["Body"].read())
        except ValueError:
            record = {"holder": "", "unreadable": True}
        date = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        return Lease(record, response["ETag"], (now - response["LastModified"]).total_seconds())

    def check_conditional_writes(self) -> None:
        """Refuse a bucket that ignores `If-None-Match` (some S3-compatible stores): there two hosts would both
        take the same lock. Asked once per manager: three small requests."""
        if self._conditional_writes_checked:
            return
        probe = self.object_key(f".conditional-write-probe-{uuid.uuid4().hex}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"", IfNoneMatch="*")
        except Exception as error:
            raise self._store_error(probe.removesuffix(".lock").rsplit("/", 1)[-1], error) from error
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"", IfNoneMatch="*")
        except Exception as error:
            if error_code(error) not in LOST_RACE:
                raise self._store_error(probe.removesuffix(".lock").rsplit("/", 1)[-1], error) from error
            self._conditional_writes_checked = True
            return
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        raise LockStoreError(
            f"s3://{self.bucket}: the store ignored a conditional write (If-None-Match: *), so its lease objects "
            "cannot keep two hosts out of the same stage -> use a store with conditional writes (AWS S3, recent "
            "MinIO, R2), or locks.backend: redis")

    # ---- Prefect's LockManager

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Take the lock for `key`: create it, or take it over once its lease ran out; a live holder is waited for
        (polling with backoff, a log line now and then, LockWaitTimeout after the bound). `hold_timeout` is
        ignored: the renewed lease replaces a fixed hold time."""
        self.check_conditional_writes()
        bound = acquire_timeout if acquire_timeout is not None else self.wait_seconds
        since = datetime.now(timezone.utc).isoformat()
        started, noticed, pause = time.monotonic(), [], self.poll_seconds
        while (etag := self._put(key, self._record(holder, since), IfNoneMatch="*")) is None:
            lease = self.read(key)
            if lease is None:
                continue  # released between the two requests: try again at once
            if lease.record.get("holder") == holder:
                return True  # re-entrant, as in Prefect's managers
            if lease.expired():
                etag = self._put(key, self._record(holder, since), IfMatch=lease.etag)
                if etag is not None:
                    lock_logger().warning("taking over lock %s: its holder stopped renewing its lease (%.0f s since its "
                                      "last renewal, lease %s s); it was held by %s", self.where(key),
                                      lease.age_seconds, lease.record.get("lease_seconds"), describe(lease.record))
                    break
                continue  # another waiter took it over first, or the holder renewed just now
            pause = self._wait_step(key, lease, started, bound, noticed, pause)
        self._start_renewing(key, HeldLock(holder=holder, etag=etag, since=since))
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        """`acquire_lock` off the event loop."""
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def _wait_step(self, key: str, lease: Lease, started: float, bound: float, noticed: list[float],
                   pause: float) -> float:
        """One poll of a wait on a live holder: a notice now and then, the error after `bound` seconds; returns the
        next pause (doubling up to max_poll_seconds)."""
        note_wait(self.where(key), lease.record, started, bound, noticed, self.notice_seconds,
                  fix=f"A holder that died loses it {lease.record.get('lease_seconds')} s after its last renewal; to "
                      f"wait longer set locks.wait_seconds or LORAFLOW_LOCK_WAIT_S")
        time.sleep(pause)
        return min(pause * 2, self.max_poll_seconds)

    def _start_renewing(self, key: str, held: HeldLock) -> None:
        self._held[key] = held
        threading.Thread(target=self._renew_until_released, args=(key, held), daemon=True,
                         name=f"lock-lease-{key}").start()

    def _renew_until_released(self, key: str, held: HeldLock) -> None:
        """Push the lease forward every third of it until released (a killed host stops, so its lease runs out)."""
        while not held.stop.wait(self.lease_seconds / 3):
            with held.mutex:  # release takes it too: a renewal never re-creates a lock just released
                if held.stop.is_set():
                    return
                try:
                    etag = self._put(key, self._record(held.holder, held.since), IfMatch=held.etag)
                except LockStoreError as error:  # the bucket out of reach for a moment: the next renewal tries again
                    lock_logger().warning("could not renew lock %s (%s); trying again in %.0f s", self.where(key), error,
                                      self.lease_seconds / 3)
                    continue
                if etag is None:
                    lock_logger().error("lost lock %s: another host took it over after this one did not renew its lease "
                                    "for %s s; the stage may run twice", self.where(key), self.lease_seconds)
                    return
                held.etag = etag

    def release_lock(self, key: str, holder: str) -> None:
        """Release `holder`'s lock for `key` and stop renewing it (ValueError if it does not hold it, as Prefect's)."""
        held = self._held.get(key)
        if held is not None and held.holder == holder:
            with held.mutex:
                held.stop.set()
            del self._held[key]
            etag = held.etag
        else:  # taken by another manager for the same holder: judge by what the bucket holds
            lease = self.read(key)
            if lease is None or lease.record.get("holder") != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key} ({self.where(key)})")
            etag = lease.etag
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key), IfMatch=etag)
        except Exception as error:
            if error_code(error) in LOST_RACE | MISSING:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}: {self.where(key)} was "
                                 "taken over by another host after this one's lease ran out") from None
            raise self._store_error(key, error) from error

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        """Whether a holder whose lease has not run out holds the lock for `key`."""
        lease = self.read(key)
        return lease is not None and not lease.expired()

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether `holder` holds the lock for `key`."""
        lease = self.read(key)
        return lease is not None and lease.record.get("holder") == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody with a live lease holds the lock for `key`; LockWaitTimeout after the bound."""
        bound = timeout if timeout is not None else self.wait_seconds
        started, noticed, pause = time.monotonic(), [], self.poll_seconds
        while (lease := self.read(key)) is not None and not lease.expired():
            pause = self._wait_step(key, lease, started, bound, noticed, pause)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """`wait_for_lock` off the event loop."""
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)
