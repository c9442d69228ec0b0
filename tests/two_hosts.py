"""Two worker processes as on two hosts: each with its own HOME (its own copy of the base model at `~/base-model`),
Prefect home and loraflow cache, sharing only the Prefect API and an s3:// bucket (moto). Used by the lock and
folder tests that freeze one worker while it holds a stage's lease and watch the other wait for it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_store_s3 import keys

REPO = Path(__file__).resolve().parent.parent

PREPARE = """
import json, sys
from flows.prepare import prepare_flow
from loraflow.config.pipeline import load_config
print("SUMMARY " + json.dumps(prepare_flow(load_config(sys.argv[1]))), flush=True)
"""

FINETUNE = """
import json, sys
from flows.finetune import finetune_flow
from loraflow.config.pipeline import load_config
print("SUMMARY " + json.dumps(finetune_flow(load_config(sys.argv[1]))), flush=True)
"""


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def give_base_model(folder: Path, model_dir: Path) -> None:
    """Copy (hard-link) the base model into the host's `~/base-model`, unless it has one."""
    if not (folder / "home" / "base-model").exists():
        shutil.copytree(model_dir, folder / "home" / "base-model", copy_function=link_or_copy)


def start_worker(folder: Path, config: Path, api_url: str, model_dir: Path,
                 script: str = PREPARE) -> tuple[subprocess.Popen, Path]:
    """A worker process running `script` (a flow; the config's path is its argument) as a host in `folder`, the
    Prefect API and the bucket's endpoint and credentials shared; its output goes to `folder`/output.log."""
    for name in ("home", "prefect", "cache"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    give_base_model(folder, model_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(folder / "home"), "PREFECT_HOME": str(folder / "prefect"),
           "LORAFLOW_CACHE": str(folder / "cache"), "PREFECT_API_URL": api_url}
    log = folder / "output.log"
    with log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-c", script, str(config)], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, text=True)
    return worker, log


def held_stage_lock(bucket, prefix: str) -> str | None:
    """The key of a stage lock held in the bucket now (not the conditional-write probe), or None."""
    held = [key for key in keys(bucket, f"{prefix}/locks/") if ".conditional-write-probe-" not in key]
    return held[0] if held else None


def freeze_while_holding(worker: subprocess.Popen, bucket, prefix: str, stage: str | None = None,
                         timeout: float = 300) -> str:
    """SIGSTOP `worker` while it holds a stage lock (of `stage`, when given: it computes that stage); returns the
    lock's key. The caller sends SIGCONT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        held = held_stage_lock(bucket, prefix)
        if held is None or (stage is not None and not held.rsplit("/", 1)[-1].startswith(f"{stage}-")):
            time.sleep(0.005)
            continue
        os.kill(worker.pid, signal.SIGSTOP)
        if held_stage_lock(bucket, prefix) == held:
            return held
        os.kill(worker.pid, signal.SIGCONT)  # it released that one just before it stopped: catch the next
    raise AssertionError(f"worker never seen holding a {stage or 'stage'} lock (exit code {worker.poll()})")


def wait_for_line(log: Path, needle: str, worker: subprocess.Popen, timeout: float = 300) -> str:
    """The first line of `log` holding `needle`, waiting for it while `worker` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in log.read_text().splitlines() if needle in line]
        if found:
            return found[0]
        assert worker.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)
    raise AssertionError(f"no line with {needle!r} in {log}:\n{log.read_text()[-4000:]}")


def summary_of(worker: subprocess.Popen, log: Path) -> dict:
    """The flow's summary, once `worker` exits 0."""
    assert worker.wait(timeout=600) == 0, log.read_text()[-4000:]
    [line] = [line for line in log.read_text().splitlines() if line.startswith("SUMMARY ")]
    return json.loads(line.removeprefix("SUMMARY "))


def one_waits_for_the_other(tmp_path: Path, config: Path, api_url: str, model_dir: Path, bucket, prefix: str,
                            script: str = PREPARE, stage: str | None = None) -> tuple[dict, dict, str, str]:
    """Worker A runs `config` and is frozen while it holds a lock (of `stage`); worker B, started then, must log that
    it waits for that lock; A goes on, both finish. Returns A's and B's summaries, the lock's key and B's wait line."""
    give_base_model(tmp_path / "host-b", model_dir)  # before A freezes
    workers = []
    try:
        worker_a, log_a = start_worker(tmp_path / "host-a", config, api_url, model_dir, script=script)
        workers.append(worker_a)
        try:
            lock_key = freeze_while_holding(worker_a, bucket, prefix, stage)
            worker_b, log_b = start_worker(tmp_path / "host-b", config, api_url, model_dir, script=script)
            workers.append(worker_b)
            waited = wait_for_line(log_b, f"waiting for lock s3://{bucket.name}/{lock_key}", worker_b)
        finally:
            os.kill(worker_a.pid, signal.SIGCONT)
        assert str(worker_a.pid) in waited, waited
        return summary_of(worker_a, log_a), summary_of(worker_b, log_b), lock_key, waited
    finally:
        for worker in workers:  # a failed wait leaves them running
            worker.kill()
            worker.wait()
