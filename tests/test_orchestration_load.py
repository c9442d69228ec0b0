"""Load on a real Prefect server (`soak` mark: minutes each, outside `make test`; `make test-all` runs them):
twenty prepare-only runs triggered through the API at once, served by two worker processes (SQLite and
PostgreSQL), and a soak of consecutive cached runs watching the worker's open files, threads and memory and the
store's size. Each prints its numbers as one JSON line (`-s` shows them; docs/reliability.md has them)."""

import json
import os
import statistics
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from loraflow.ops.server import CPU_POOL, LocalPrefect
from tests.postgres import postgres_bin, postgres_server
from tests.test_orchestration_faults import start_run
from tests.test_server import BUSY_ANSWERS, api, deploy, free_port, small_config, wait_for_terminal_state

pytestmark = pytest.mark.soak

RUNS_AT_ONCE = 20
RUNS_PER_WORKER = 2  # `prefect worker start --limit`: two cores, so two runs at a time per worker
SOAK_RUNS = int(os.environ.get("LORAFLOW_SOAK_RUNS", "50"))


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def store_bytes(store: Path) -> int:
    return sum(path.stat().st_size for path in store.rglob("*") if path.is_file() and "locks" not in path.parts)


def serving(tmp_path: Path, stack: ExitStack, database: str) -> LocalPrefect:
    """A server (SQLite or a fresh PostgreSQL) with prepare-only deployed."""
    database_url = stack.enter_context(postgres_server(free_port()))[0] if database == "postgresql" else None
    local = stack.enter_context(LocalPrefect(port=free_port(), home=tmp_path / "home", database_url=database_url,
                                             log_dir=tmp_path / "logs"))
    local.ensure_pools()
    deploy(local, "prepare-only")
    return local


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_twenty_runs_at_once_all_complete_once(tmp_path, database, monkeypatch):
    if database == "postgresql" and postgres_bin() is None:
        pytest.skip("Debian's postgresql is not installed")
    config = {**small_config(tmp_path), "name": "load"}
    BUSY_ANSWERS.clear()
    monkeypatch.setenv("PREFECT_SERVER_LOG_RETRYABLE_ERRORS", "true")  # count the busy database's 503s in the log
    with ExitStack() as stack:
        local = serving(tmp_path, stack, database)
        for worker in range(2):
            local.start_worker(CPU_POOL, name=f"worker-load-{worker}", limit=RUNS_PER_WORKER)
        started, run_ids, trigger_s = time.monotonic(), [], []
        for _ in range(RUNS_AT_ONCE):
            run_ids.append(start_run(local, config, "prepare/prepare-only", timeout=300))
            trigger_s.append(time.monotonic() - started - sum(trigger_s))
        finished = [wait_for_terminal_state(local, run_id, timeout=1800) for run_id in run_ids]
        wall_s = time.monotonic() - started
    states = [run["state"]["type"] for run in finished]
    assert states == ["COMPLETED"] * RUNS_AT_ONCE, states
    assert len({run["id"] for run in finished}) == RUNS_AT_ONCE
    summaries = sorted((tmp_path / "runs" / "load").glob("*/summary.json"))
    assert len(summaries) == RUNS_AT_ONCE, summaries  # one run folder per run: none lost, none run twice
    computed = [json.loads(path.read_text()) for path in summaries]
    stages = [stage for stage, value in computed[0].items() if isinstance(value, dict) and "cached" in value]
    for stage in stages:  # each stage computed by exactly one run; the others waited for its lock, then hit the cache
        assert sum(not summary[stage]["cached"] for summary in computed) == 1, stage
    assert len({summary["tokens"]["sha256"] for summary in computed}) == 1
    waits = sorted(seconds_between(run["expected_start_time"], run["start_time"]) for run in finished)
    logs = {path.stem: path.read_text(errors="replace") for path in (tmp_path / "logs").glob("*.log")}
    locked = logs["server"].count("database is locked")  # answered 503 and retried by the client
    assert not any("database is locked" in text for name, text in logs.items() if name != "server")  # no run hurt
    if database == "postgresql":
        assert locked == 0 and not BUSY_ANSWERS
    print(json.dumps({"test": "load", "database": database, "runs": RUNS_AT_ONCE, "workers": 2,
                      "runs_per_worker": RUNS_PER_WORKER, "wall_s": round(wall_s, 1),
                      "trigger_max_s": round(max(trigger_s), 1), "all_triggered_s": round(sum(trigger_s), 1),
                      "busy_answers_retried": len(BUSY_ANSWERS), "server_database_locked": locked, "start_wait_p50_s": round(statistics.median(waits), 1),
                      "start_wait_p95_s": round(waits[int(0.95 * (len(waits) - 1))], 1)}))


def test_soak_of_consecutive_cached_runs_keeps_the_worker_and_store_flat(tmp_path):
    config = {**small_config(tmp_path), "name": "soak"}
    BUSY_ANSWERS.clear()
    with ExitStack() as stack:
        local = serving(tmp_path, stack, "sqlite")
        worker = psutil.Process(local.start_worker(CPU_POOL, name="soak-worker").pid)
        samples = []
        for number in range(SOAK_RUNS):
            finished = wait_for_terminal_state(local, start_run(local, config, "prepare/prepare-only"), timeout=600)
            assert finished["state"]["type"] == "COMPLETED", (number, finished["state"])
            samples.append({"rss_mb": worker.memory_info().rss / 2**20, "threads": worker.num_threads(),
                            "open_files": worker.num_fds(), "store_bytes": store_bytes(Path(config["store"]))})
    # After the first (computing) run and a warm-up, nothing grows: the store not at all, the worker within bounds.
    settled, last = samples[min(2, len(samples) - 1)], samples[-1]
    assert all(sample["store_bytes"] == samples[0]["store_bytes"] for sample in samples[1:]), samples
    assert last["open_files"] <= settled["open_files"] + 5, samples
    assert last["threads"] <= settled["threads"] + 5, samples
    assert last["rss_mb"] <= settled["rss_mb"] * 1.25 + 20, samples
    print(json.dumps({"test": "soak", "runs": SOAK_RUNS, "busy_answers_retried": len(BUSY_ANSWERS), "first": samples[0], "settled": settled, "last": last}))
