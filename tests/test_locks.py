"""Stage locks (loraflow.runtime.stage_locks) against real processes: a kill -9'd holder's lock is taken over, a live holder
is waited for with a message and a bounded wait, another host's expired lease is taken over, and a live
holder's heartbeat keeps its lease from expiring."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from loraflow.runtime.stage_locks import LeaseLockManager, LockWaitTimeout, read_lock

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from loraflow.runtime.stage_locks import LeaseLockManager
directory, lease, hold, host = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] or None
manager = LeaseLockManager(directory, lease_seconds=lease, host=host)
manager.acquire_lock("train-abc", holder="holder-in-child")
print("LOCKED", flush=True)
time.sleep(hold)
manager.release_lock("train-abc", holder="holder-in-child")
print("RELEASED", flush=True)
"""


def hold_lock(directory: Path, *, lease: float = 60, hold: float = 600, host: str = "") -> subprocess.Popen:
    """A child process that takes `train-abc` through LeaseLockManager, says LOCKED, holds it `hold` seconds."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), str(lease), str(hold), host], cwd=REPO,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "LOCKED"
    return child


@pytest.fixture
def lock_log(caplog):
    caplog.set_level(logging.INFO, logger="loraflow.runtime.stage_locks")
    return caplog


def test_lock_of_a_killed_holder_is_taken_over_at_once(tmp_path, lock_log):
    child = hold_lock(tmp_path)
    lock_file = tmp_path / "train-abc.lock"
    assert read_lock(lock_file)["pid"] == child.pid
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert lock_file.exists()  # what kill -9 leaves behind

    started = time.monotonic()
    manager = LeaseLockManager(tmp_path, wait_seconds=30)
    assert manager.acquire_lock("train-abc", holder="me")
    assert time.monotonic() - started < 30  # not the 60 s lease: the dead pid is noticed at once
    assert read_lock(lock_file)["holder"] == "me" and read_lock(lock_file)["pid"] == os.getpid()
    taken = [r for r in lock_log.records if r.levelno == logging.WARNING and "taking over" in r.getMessage()]
    assert len(taken) == 1
    assert str(lock_file) in taken[0].getMessage() and f"pid {child.pid}" in taken[0].getMessage()
    manager.release_lock("train-abc", holder="me")
    assert not lock_file.exists()


def test_lock_left_by_prefects_plain_manager_with_no_lease_is_taken_over(tmp_path, lock_log):
    """The file of the bug report: Prefect's format, expiration null, from a process that no longer exists."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / "train-abc.lock"
    lock_file.write_text(json.dumps({"holder": f"{os.uname().nodename}:{dead.pid}:1:MainThread", "expiration": None}))
    manager = LeaseLockManager(tmp_path, wait_seconds=10, host=os.uname().nodename)
    assert manager.acquire_lock("train-abc", holder="me")
    assert any(f"pid {dead.pid}" in r.getMessage() for r in lock_log.records if r.levelno == logging.WARNING)
    manager.release_lock("train-abc", holder="me")


def test_live_holder_is_waited_for_with_a_message_then_the_lock_is_taken(tmp_path, lock_log):
    child = hold_lock(tmp_path, hold=2)
    manager = LeaseLockManager(tmp_path, wait_seconds=60)
    started = time.monotonic()
    assert manager.acquire_lock("train-abc", holder="me")
    assert 0.5 < time.monotonic() - started < 30
    assert child.wait(timeout=30) == 0 and child.stdout.read().strip() == "RELEASED"
    waits = [r.getMessage() for r in lock_log.records if "waiting for lock" in r.getMessage()]
    assert waits and f"pid {child.pid}" in waits[0] and "since 20" in waits[0]
    assert not [r for r in lock_log.records if "taking over" in r.getMessage()]  # a live lock is never broken
    manager.release_lock("train-abc", holder="me")


def test_live_holder_past_the_bound_is_a_clear_error(tmp_path, lock_log):
    child = hold_lock(tmp_path)
    try:
        manager = LeaseLockManager(tmp_path, wait_seconds=1.5)
        with pytest.raises(LockWaitTimeout) as error:
            manager.acquire_lock("train-abc", holder="me")
        message = str(error.value)
        lock_file = tmp_path / "train-abc.lock"
        assert str(lock_file) in message and f"pid {child.pid}" in message
        assert f"delete {lock_file}" in message and "LORAFLOW_LOCK_WAIT_S" in message
        assert read_lock(lock_file)["pid"] == child.pid  # the live holder still holds it
    finally:
        child.kill()
        child.wait()


def test_expired_lease_of_another_host_is_taken_over(tmp_path, lock_log):
    lock_file = tmp_path / "train-abc.lock"
    expired = (datetime.now(timezone.utc) - timedelta(seconds=5)).isoformat()
    lock_file.write_text(json.dumps({"holder": "elsewhere", "pid": 4242, "host": "other-host",
                                     "expiration": expired, "since": "2026-12-01T00:00:00+00:00"}))
    manager = LeaseLockManager(tmp_path, wait_seconds=10)
    assert manager.acquire_lock("train-abc", holder="me")
    taken = [r.getMessage() for r in lock_log.records if "taking over" in r.getMessage()]
    assert len(taken) == 1 and "other-host" in taken[0] and "4242" in taken[0] and str(lock_file) in taken[0]
    manager.release_lock("train-abc", holder="me")


def test_unexpired_lease_of_another_host_is_waited_for(tmp_path):
    """Another host's pid means nothing here: only its lease says whether it is alive."""
    lock_file = tmp_path / "train-abc.lock"
    lease = (datetime.now(timezone.utc) + timedelta(seconds=600)).isoformat()
    lock_file.write_text(json.dumps({"holder": "elsewhere", "pid": 4242, "host": "other-host", "expiration": lease}))
    with pytest.raises(LockWaitTimeout, match="other-host"):
        LeaseLockManager(tmp_path, wait_seconds=1).acquire_lock("train-abc", holder="me")
    assert json.loads(lock_file.read_text())["holder"] == "elsewhere"


def test_heartbeat_keeps_a_long_holders_lease_alive(tmp_path):
    """A 1 s lease held 4 s: a waiter that can only judge by the lease (it sees another host) never takes over."""
    child = hold_lock(tmp_path, lease=1, hold=4, host="host-a")
    lock_file = tmp_path / "train-abc.lock"
    first = read_lock(lock_file)
    waiter = LeaseLockManager(tmp_path, wait_seconds=2.5, host="host-b")
    with pytest.raises(LockWaitTimeout):
        waiter.acquire_lock("train-abc", holder="waiter")
    renewed = read_lock(lock_file)
    assert renewed["holder"] == "holder-in-child" and renewed["since"] == first["since"]
    assert renewed["expiration"] > first["expiration"]
    assert datetime.fromisoformat(renewed["expiration"]) > datetime.now(timezone.utc)
    assert child.wait(timeout=30) == 0 and child.stdout.read().strip() == "RELEASED"
    assert not lock_file.exists()  # released, and the heartbeat did not write it back


# ---- through run_locked and Prefect's transaction, as train/evaluate/publish use it

from prefect import flow, task  # noqa: E402

from loraflow.runtime.cache_keys import STAGE_CACHE  # noqa: E402
from loraflow.runtime.stage_task import run_locked  # noqa: E402


@task(name="lock-test-double")
def slow_double(value: int, hang: bool) -> int:
    if hang:
        print("WORKING", flush=True)
        time.sleep(600)
    return value * 2


@flow(name="lock-test-flow")
def double_locked(store_root: str, hang: bool) -> tuple:
    # the key ignores `hang`: the killed run and the re-run are the same stage with the same inputs
    return run_locked(slow_double, store_root, lambda result: True, cache_policy=STAGE_CACHE - "hang",
                      value=21, hang=hang)


RUN_LOCKED = """
import sys
from tests.test_locks import double_locked
double_locked(sys.argv[1], hang=True)
"""


def test_run_locked_takes_over_the_lock_of_a_killed_run(prefect_api, tmp_path, lock_log):
    from prefect.settings import PREFECT_API_URL

    lock_log.set_level(logging.INFO)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    killed = subprocess.Popen([sys.executable, "-c", RUN_LOCKED, str(store)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in killed.stdout:  # the task runs, so its lock is held
        if "WORKING" in line:
            break
    [lock_file] = (store / "locks").glob("lock-test-double-*.lock")
    assert read_lock(lock_file)["pid"] == killed.pid
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert lock_file.exists()

    started = time.monotonic()
    assert double_locked(str(store), hang=False) == (42, False)
    assert time.monotonic() - started < 30  # the flow run's own overhead; before the fix it waited forever
    taken = [r.getMessage() for r in lock_log.records if "taking over" in r.getMessage()]
    assert len(taken) == 1 and str(lock_file) in taken[0] and f"pid {killed.pid}" in taken[0]
    assert not lock_file.exists()


# ---- end to end: kill -9 a real `loraflow run` mid-training, then re-run it


@pytest.mark.slow
def test_killed_cli_run_is_resumed_at_once_by_the_next_run(tmp_path):
    from loraflow.training.checkpoints import CHECKPOINT_MARKER
    from tests.test_finetune_flow import tiny_config
    from tests.tiny_llama import build_tiny_llama

    # The tiny random Llama: the lock, not the model, is the point. It is killed within 0.1 s of its first checkpoint
    # (step 2), while the 18 steps left take about 9 s: still training.
    steps = 20
    config = tiny_config(tmp_path, build_tiny_llama(tmp_path / "tiny-llama"))
    config.write_text(config.read_text().replace("max_steps: 2,", f"max_steps: {steps}, checkpoint_every: 2,"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "home"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    command = [sys.executable, "-m", "loraflow.cli.commands", "run", str(config)]
    # Its own process group, killed whole (as the OOM killer or a preempted VM would): no orphaned API server.
    killed = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "store").glob(f"**/checkpoints/checkpoint-*/{CHECKPOINT_MARKER}")):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    lock_files = list((tmp_path / "store" / "locks").glob("train-*.lock"))
    assert len(lock_files) == 1 and read_lock(lock_files[0])["pid"] == killed.pid  # the lock of the bug report

    started = time.monotonic()
    rerun = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    taken_after, lines = None, []
    for line in rerun.stdout:
        lines.append(line)
        if taken_after is None and "taking over lock" in line:
            taken_after = time.monotonic() - started
    assert rerun.wait(timeout=600) == 0, "".join(lines[-60:])
    # Prefect's API start and the cached prepare stages come first; then the lock is taken over at once.
    assert taken_after is not None and taken_after < 120, "".join(lines[-60:])
    taken = next(line for line in lines if "taking over lock" in line)
    assert str(lock_files[0]) in taken and f"pid {killed.pid}" in taken
    print(f"lock taken over {taken_after:.1f} s after the re-run started")
    summary_path = next(line.strip() for line in reversed(lines) if line.strip().endswith(".json"))  # stdout's last
    summary = json.loads(Path(summary_path).read_text())
    assert summary["train"]["resumed_from_step"] >= 2 and summary["train"]["global_step"] == steps
    assert not lock_files[0].exists()


def test_run_locked_waits_for_a_live_run_and_fails_clearly_after_the_bound(prefect_api, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    live = subprocess.Popen([sys.executable, "-c", RUN_LOCKED, str(store)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in live.stdout:
            if "WORKING" in line:
                break
        monkeypatch.setenv("LORAFLOW_LOCK_WAIT_S", "2")
        with pytest.raises(LockWaitTimeout, match=f"pid {live.pid}"):
            double_locked(str(store), hang=False)
        [lock_file] = (store / "locks").glob("lock-test-double-*.lock")
        assert read_lock(lock_file)["pid"] == live.pid
    finally:
        live.kill()
        live.wait()
