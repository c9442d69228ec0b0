"""Stage locks in Redis (locks.backend: redis): prefect-redis's `RedisLockManager`, with a lease.

Prefect's transaction asks for a lock with no hold timeout, so the plain manager's lock of a killed holder would stay
in Redis for ever and every later run would wait on it. Here each lock is taken with a TTL of `lease_seconds`, a
thread renews it (redis-py's `Lock.reacquire`, which checks the token) every third of that while the stage runs, and a
waiter gives up after a bound with an error naming the lock. Requires `pip install prefect-redis`.
"""

import os
import threading
from urllib.parse import urlsplit

from loraflow.runtime.stage_locks import LEASE_SECONDS, WAIT_SECONDS, LockWaitTimeout, lock_logger

try:
    from prefect_redis.locking import RedisLockManager
except ImportError:  # the backend is opt-in: only a config that asks for it needs the package
    RedisLockManager = None


def connection_params(url: str) -> dict:
    """RedisLockManager's connection fields from `redis[s]://[user@]host[:port][/db]`; the password from the
    environment's REDIS_PASSWORD (never from the URL, which is a flow parameter)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"locks.redis_url {url!r}: expected redis://host:port/db (or rediss:// for TLS)")
    if parts.password:
        raise ValueError("locks.redis_url: a password in the URL is refused (it is a flow parameter, shown in the UI) "
                         "-> set REDIS_PASSWORD in the worker's environment")
    return {"host": parts.hostname, "port": parts.port or 6379, "db": int(parts.path.strip("/") or 0),
            "username": parts.username, "password": os.environ.get("REDIS_PASSWORD"), "ssl": parts.scheme == "rediss"}


def redis_lock_manager(url: str, *, lease_seconds: float = LEASE_SECONDS, wait_seconds: float | None = None):
    """A `RedisLeaseLockManager` on the Redis at `url`; a clear error when prefect-redis is not installed."""
    if RedisLockManager is None:
        raise ImportError("locks.backend: redis needs prefect-redis -> pip install 'loraflow[redis]' (or "
                          "prefect-redis), or use locks.backend: object-store or local")
    return RedisLeaseLockManager(connection_params(url), lease_seconds=lease_seconds, wait_seconds=wait_seconds)


class RedisLeaseLockManager(RedisLockManager or object):
    """prefect-redis's lock manager whose locks expire `lease_seconds` after their holder stopped renewing them."""

    def __init__(self, params: dict, *, lease_seconds: float = LEASE_SECONDS, wait_seconds: float | None = None) -> None:
        super().__init__(**params)
        self.lease_seconds = lease_seconds
        env_wait = os.environ.get("LORAFLOW_LOCK_WAIT_S")
        self.wait_seconds = wait_seconds if wait_seconds is not None else float(env_wait or WAIT_SECONDS)
        self._renewals: dict[str, threading.Event] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "lease_seconds": self.lease_seconds, "wait_seconds": self.wait_seconds}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._renewals = {}

    def where(self, key: str) -> str:
        """The lock's Redis key and server, for messages."""
        return f"redis://{self.host}:{self.port}/{self.db} key {self._lock_name_for_key(key)}"

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Take the lock for `key` with a renewed lease, waiting (bounded) for a live holder: LockWaitTimeout after
        the bound. `hold_timeout` is ignored: the lease replaces a fixed hold time."""
        bound = acquire_timeout if acquire_timeout is not None else self.wait_seconds
        if self.is_locked(key) and not self.is_lock_holder(key, holder):
            lock_logger().info("waiting for lock %s, held by %s (at most %.0f s)", self.where(key),
                               self.client.get(self._lock_name_for_key(key)), bound)
        if not super().acquire_lock(key, holder, acquire_timeout=bound, hold_timeout=self.lease_seconds):
            raise LockWaitTimeout(
                f"gave up after {bound:.0f} s waiting for lock {self.where(key)}. A holder that died loses it "
                f"{self.lease_seconds:.0f} s after its last renewal; to wait longer set locks.wait_seconds or "
                "LORAFLOW_LOCK_WAIT_S")
        if key not in self._renewals:
            stop = self._renewals[key] = threading.Event()
            threading.Thread(target=self._renew_until_released, args=(key, stop), daemon=True,
                             name=f"lock-lease-{key}").start()
        return True

    def _renew_until_released(self, key: str, stop: threading.Event) -> None:
        """Reset the lock's TTL every third of the lease until released (a killed holder stops: the key expires)."""
        from redis.exceptions import LockError, RedisError

        while not stop.wait(self.lease_seconds / 3):
            lock = self._locks.get(self._lock_name_for_key(key))
            if lock is None or stop.is_set():
                return
            try:
                lock.reacquire()
            except LockError:
                lock_logger().error("lost lock %s: it expired before this holder renewed it (%.0f s lease); the stage "
                                    "may run twice", self.where(key), self.lease_seconds)
                return
            except RedisError as error:  # Redis out of reach for a moment: the next renewal tries again
                lock_logger().warning("could not renew lock %s (%s)", self.where(key), error)

    def release_lock(self, key: str, holder: str) -> None:
        """Stop renewing the lock for `key`, then release it as prefect-redis does."""
        if (stop := self._renewals.pop(key, None)) is not None:
            stop.set()
        super().release_lock(key, holder)
