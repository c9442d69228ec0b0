"""File locks that do not outlive their holder: Prefect's `FileSystemLockManager`, with a lease.

Each lock file holds its holder's pid, host and process start time and a lease expiration that a heartbeat
thread renews while the holder runs. A waiter takes over a lock whose holder is dead (on this host: its pid is
gone or reused; on another host: its lease expired) and logs that it did; it waits for a live holder with a log
line naming who holds the lock and since when, and gives up after a bound with an error naming the lock file.
Lock files written by Prefect's plain manager (`{"holder": "host:pid:...", "expiration": null}`, what a kill -9
left behind before this module) are judged the same way from the pid and host in their holder string.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
from prefect.locking.filesystem import FileSystemLockManager

from loraflow.runtime.atomic_files import write_text_atomic

LEASE_SECONDS = 60.0  # another host takes over a silent holder's lock after this long
WAIT_SECONDS = 6 * 3600.0  # a twin run waits this long for a live holder (a training run) before failing
NOTICE_SECONDS = 60.0  # how often a waiter says it is still waiting

log_default = logging.getLogger("loraflow.runtime.stage_locks")


class LockWaitTimeout(TimeoutError):
    """A live holder kept a lock longer than the waiter's bound."""


def process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of `pid` from /proc/<pid>/stat, or None where the process or /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces; fields 3.. follow it
    return fields[0], fields[19]


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` on this host still runs and is the one that started at `start` (not a reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    stat = process_stat(pid)
    if stat is None:
        return True  # no /proc to look closer: trust the signal check
    state, started = stat
    return state != "Z" and (start is None or started == start)  # a zombie is dead; a new start is a reused pid


def parse_time(text: str | None) -> datetime | None:
    """An ISO timestamp (also Prefect's `str(datetime)` form) as an aware UTC datetime; None stays None."""
    if text is None:
        return None
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def read_lock(path: Path) -> dict | None:
    """The lock record in `path` with `pid`, `host` and `expiration` filled in, or None if there is no lock.

    A file that is not JSON (a writer of Prefect's plain manager between creating and writing it) gets an
    expiration one lease after its mtime, so it is waited for briefly and then taken over."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        expires = datetime.fromtimestamp(mtime, timezone.utc) + timedelta(seconds=LEASE_SECONDS)
        return {"holder": "", "pid": None, "host": None, "expiration": expires.isoformat(), "unreadable": True}
    if "pid" not in record:  # Prefect's own format: holder is "host:pid:thread-id:thread-name[:task-id]"
        host, _, rest = str(record.get("holder", "")).partition(":")
        pid = rest.split(":", 1)[0]
        record.update(host=host or None, pid=int(pid) if pid.isdigit() else None)
    return record


def dead_reason(record: dict, host: str, now: datetime) -> str | None:
    """Why the holder of `record` is dead, or None while it may be alive.

    On this host the pid decides (a live process keeps its lock whatever its lease says); elsewhere the lease."""
    if record.get("host") == host and record.get("pid") is not None:
        if pid_alive(record["pid"], record.get("pid_start")):
            return None
        return f"its holder pid {record['pid']} on this host ({host}) is gone"
    expiration = parse_time(record.get("expiration"))
    if expiration is not None and expiration < now:
        return (f"its holder pid {record.get('pid')} on host {record.get('host')} stopped renewing its lease "
                f"(expired {expiration.isoformat()})")
    return None



def note_wait(where: str, record: dict, started: float, bound: float, noticed: list[float], notice_seconds: float,
              fix: str) -> None:
    """A wait on a live holder of lock `where`: the error, ending in `fix`, once `bound` seconds have passed; else a
    notice every `notice_seconds` (their times kept in `noticed`)."""
    waited = time.monotonic() - started
    if waited >= bound:
        raise LockWaitTimeout(f"gave up after {waited:.0f} s waiting for lock {where}, held by {describe(record)}. "
                              f"{fix} (now {bound:.0f})")
    if not noticed or time.monotonic() - noticed[-1] >= notice_seconds:
        noticed.append(time.monotonic())
        lock_logger().info("waiting for lock %s, held by %s (waited %.0f s of at most %.0f s)",
                           where, describe(record), waited, bound)

def describe(record: dict) -> str:
    """Who holds a lock and since when, for log lines and errors."""
    lease = record.get("expiration") or "never (no lease)"
    return (f"pid {record.get('pid')} on host {record.get('host')} (holder {record.get('holder')!r}), "
            f"since {record.get('since', 'unknown')}, lease until {lease}")


def write_new(path: Path, record: dict) -> bool:
    """Create `path` holding `record` atomically (hard link of a complete temp file); False if it exists.

    Atomic so that no reader ever sees an empty lock file, which Prefect's touch-then-write allows."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def lock_logger():
    """The Prefect run logger inside a flow or task run (so the UI shows lock waits), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log_default


class LeaseLockManager(FileSystemLockManager):
    """`FileSystemLockManager` whose locks carry holder pid/host and a renewed lease, so dead holders lose them."""

    def __init__(self, lock_files_directory: Path, *, lease_seconds: float = LEASE_SECONDS,
                 wait_seconds: float | None = None, notice_seconds: float = NOTICE_SECONDS,
                 poll_seconds: float = 0.2, host: str | None = None) -> None:
        super().__init__(lock_files_directory)
        self.lease_seconds = lease_seconds
        env_wait = os.environ.get("LORAFLOW_LOCK_WAIT_S")
        self.wait_seconds = wait_seconds if wait_seconds is not None else float(env_wait or WAIT_SECONDS)
        self.notice_seconds = notice_seconds
        self.poll_seconds = poll_seconds
        self.host = host or socket.gethostname()
        self._heartbeats: dict[str, tuple[threading.Event, threading.Lock]] = {}

    def _record(self, holder: str, since: str) -> dict:
        expiration = datetime.now(timezone.utc) + timedelta(seconds=self.lease_seconds)
        stat = process_stat(os.getpid())
        return {"holder": holder, "expiration": expiration.isoformat(), "pid": os.getpid(), "host": self.host,
                "pid_start": stat[1] if stat else None, "since": since}

    def _live_record(self, path: Path) -> dict | None:
        """The record of a live holder of `path`, or None once it is free (a dead holder's lock is removed)."""
        record = read_lock(path)
        if record is None:
            return None
        reason = dead_reason(record, self.host, datetime.now(timezone.utc))
        if reason is None:
            return record
        # Re-read right before removing: a lock a live process took since the first read is left alone (the
        # window left is this read to the unlink, microseconds, against a holder that died seconds ago).
        if read_lock(path) == record:
            path.unlink(missing_ok=True)
            lock_logger().warning("taking over lock %s: %s; it was held by %s", path, reason, describe(record))
        return None

    def _wait_step(self, path: Path, record: dict, started: float, bound: float, noticed: list[float]) -> None:
        """One poll of a wait on a live holder: a notice now and then, the error after `bound` seconds."""
        note_wait(str(path), record, started, bound, noticed, self.notice_seconds,
                  fix=f"If that process is really gone (e.g. on another machine), delete {path} and re-run; to wait "
                      f"longer set LORAFLOW_LOCK_WAIT_S")
        time.sleep(self.poll_seconds)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Take the lock for `key`, taking over a dead holder's and waiting (bounded) for a live one's."""
        # `hold_timeout` is ignored: the renewed lease replaces a fixed hold time (Prefect passes None anyway).
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        bound = acquire_timeout if acquire_timeout is not None else self.wait_seconds
        started, noticed = time.monotonic(), []
        while not write_new(path, self._record(holder, datetime.now(timezone.utc).isoformat())):
            record = self._live_record(path)
            if record is None:
                continue
            if record.get("holder") == holder:
                return True  # re-entrant, as in Prefect's manager
            self._wait_step(path, record, started, bound, noticed)
        self._start_heartbeat(key, path, holder)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        """`acquire_lock` off the event loop."""
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def _start_heartbeat(self, key: str, path: Path, holder: str) -> None:
        stop, mutex = threading.Event(), threading.Lock()
        self._heartbeats[key] = (stop, mutex)
        threading.Thread(target=self._renew_until, args=(path, holder, stop, mutex), daemon=True,
                         name=f"lock-lease-{path.name}").start()

    def _renew_until(self, path: Path, holder: str, stop: threading.Event, mutex: threading.Lock) -> None:
        """Push the lease forward every third of it until released (a kill -9 stops it, so the lease runs out)."""
        while not stop.wait(self.lease_seconds / 3):
            with mutex:  # release takes it too, so a renewal never re-creates a lock file just released
                record = read_lock(path)
                if stop.is_set() or record is None or record.get("holder") != holder:
                    return  # released, or taken over: never write over someone else's lock
                # atomic: readers see the old or the new lease, never half
                write_text_atomic(path, json.dumps(self._record(holder, record.get("since"))))

    def release_lock(self, key: str, holder: str) -> None:
        """Release `holder`'s lock for `key` and stop renewing it (ValueError if it does not hold it, as Prefect's)."""
        if (heartbeat := self._heartbeats.pop(key, None)) is not None:
            stop, mutex = heartbeat
            with mutex:
                stop.set()
        path = self._lock_path_for_key(key)
        record = read_lock(path)
        if record is None:
            raise ValueError(f"No lock for transaction with key {key}")
        if record.get("holder") != holder:
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        path.unlink(missing_ok=True)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        """Whether a live holder holds the lock for `key` (a dead holder's lock is removed)."""
        return self._live_record(self._lock_path_for_key(key)) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether `holder` holds the lock for `key`."""
        record = read_lock(self._lock_path_for_key(key))
        return record is not None and record.get("holder") == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody alive holds the lock for `key`; LockWaitTimeout after the bound."""
        path = self._lock_path_for_key(key)
        bound = timeout if timeout is not None else self.wait_seconds
        started, noticed = time.monotonic(), []
        while (record := self._live_record(path)) is not None:
            self._wait_step(path, record, started, bound, noticed)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """`wait_for_lock` off the event loop."""
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)
