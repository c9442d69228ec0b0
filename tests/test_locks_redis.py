"""Stage locks in Redis (locks.backend: redis): prefect-redis's RedisLockManager with a lease, against a real
redis-server on a loopback port and real holder processes. Skipped where redis-server or prefect-redis is missing."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect_redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)

from prefect import flow, task  # noqa: E402

from loraflow.config.locks import LockConfig  # noqa: E402
from loraflow.runtime.redis_locks import RedisLeaseLockManager, connection_params, redis_lock_manager  # noqa: E402
from loraflow.runtime.stage_locks import LockWaitTimeout  # noqa: E402
from loraflow.runtime.stage_task import run_locked, shared_lock_manager  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LEASE = 2.0

HOLD = """
import sys, time
from loraflow.runtime.redis_locks import redis_lock_manager
url, lease, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
manager = redis_lock_manager(url, lease_seconds=lease)
manager.acquire_lock("train-abc", holder="holder-in-child")
print("LOCKED", flush=True)
time.sleep(hold)
manager.release_lock("train-abc", holder="holder-in-child")
print("RELEASED", flush=True)
"""


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A redis-server of its own on 127.0.0.1 and a free port, no persistence, for this module."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    manager = redis_lock_manager(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            manager.client.ping()
            break
        except Exception:
            assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=30)


def hold_lock(url: str, *, hold: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, url, str(LEASE), str(hold)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "LOCKED"
    return child


def test_live_holders_lease_is_renewed_and_waited_for_then_a_clear_error(redis_url):
    child = hold_lock(redis_url, hold=LEASE * 4)
    try:
        waiter = redis_lock_manager(redis_url, lease_seconds=LEASE, wait_seconds=LEASE * 2)
        with pytest.raises(LockWaitTimeout, match="lock:train-abc.*locks.wait_seconds"):
            waiter.acquire_lock("train-abc", holder="waiter")  # waits past the lease: the renewals keep it
        assert waiter.is_locked("train-abc") and not waiter.is_lock_holder("train-abc", "waiter")
        assert waiter.acquire_lock("train-abc", holder="waiter", acquire_timeout=LEASE * 4)  # released: taken
        assert child.wait(timeout=30) == 0 and child.stdout.read().strip() == "RELEASED"
        waiter.release_lock("train-abc", holder="waiter")
        assert not waiter.is_locked("train-abc")
    finally:
        child.kill()
        child.wait()


def test_killed_holders_lock_expires_after_its_lease(redis_url):
    child = hold_lock(redis_url, hold=600)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    waiter = redis_lock_manager(redis_url, lease_seconds=LEASE, wait_seconds=30)
    assert waiter.is_locked("train-abc")  # what the dead holder left
    started = time.monotonic()
    assert waiter.acquire_lock("train-abc", holder="waiter")
    assert time.monotonic() - started < LEASE + 5  # within its lease, not never (Prefect's plain manager: no TTL)
    waiter.release_lock("train-abc", holder="waiter")


@task(name="redis-locked-square")
def locked_square(value: int) -> int:
    return value * value


@flow(name="redis-locked-twice")
def locked_twice(store_root: str, redis_url: str) -> list:
    locks = shared_lock_manager(LockConfig(backend="redis", redis_url=redis_url, lease_seconds=3), store_root)
    return [run_locked(locked_square, store_root, lambda result: True, lock_manager=locks, value=3) for _ in range(2)]


def test_run_locked_through_prefects_transaction(prefect_api, redis_url, tmp_path):
    assert locked_twice(str(tmp_path / "store"), redis_url) == [(9, False), (9, True)]
    manager = redis_lock_manager(redis_url)
    assert not manager.client.keys("lock:redis-locked-square-*")  # taken and released in Redis
    assert not (tmp_path / "store" / "locks").exists()  # no lock file on this host


def test_config_refuses_a_password_in_the_url_and_the_manager_takes_it_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="REDIS_PASSWORD") as error:
        LockConfig(backend="redis", redis_url="redis://user:hunter2@redis.internal:6379/0")
    assert "hunter2" not in str(error.value)
    monkeypatch.setenv("REDIS_PASSWORD", "from-env")
    assert connection_params("rediss://user@redis.internal:6380/2") == {
        "host": "redis.internal", "port": 6380, "db": 2, "username": "user", "password": "from-env", "ssl": True}
    assert isinstance(redis_lock_manager("redis://127.0.0.1:1/0"), RedisLeaseLockManager)  # connects lazily
