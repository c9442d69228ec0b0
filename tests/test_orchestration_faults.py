"""Faults of the orchestration around the stages, against a real Prefect server and process worker started here:
a worker killed with its runs mid-training (the run is marked Crashed by the crash-detection automation, a re-run
resumes and publishes once) and a Cancel from the API mid-training (the training process tree ends within 30 s, a
re-run resumes). The server or its database restarted during a run: tests/test_orchestration_restarts.py (its own
file, so that pytest-xdist's `--dist loadfile` can run it beside these two)."""

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from loraflow.ops.server import CPU_POOL, LocalPrefect
from loraflow.training.checkpoints import CHECKPOINT_MARKER
from tests.test_server import api, deploy, free_port, stop_workers, wait_for_terminal_state

pytestmark = pytest.mark.slow

# Long enough to be hit: the run is killed or cancelled at its first checkpoint (step 2), and a Cancel ends its
# processes in about 4 s, while the 22 steps left take about 11 s and evaluate and publish about 7 s more.
TRAIN_STEPS = 24
# The crash-detection window of this module's server: `loraflow server`'s is 90 s; 60 s still spans two of a run's
# heartbeats (30 s apart), so a live run is never marked, and a dead one is marked 30 s sooner.
SILENT_SECONDS = 60


def training_config(tmp_path: Path, name: str, steps: int = TRAIN_STEPS) -> dict:
    """The tiny random Llama trained for `steps` steps with a checkpoint every 2."""
    from tests.test_finetune_flow import tiny_config
    from tests.tiny_llama import build_tiny_llama

    config = yaml.safe_load(tiny_config(tmp_path, build_tiny_llama(tmp_path / "tiny-llama")).read_text())
    config["name"] = name
    config["train"].update(max_steps=steps, checkpoint_every=2)
    return config


def start_run(local: LocalPrefect, config: dict, deployment: str = "finetune/finetune", timeout: float = 30) -> str:
    """A flow run of `deployment` created through the API, as the UI's Run button does; its id."""
    found = api(local, "GET", f"/deployments/name/{deployment}", timeout=timeout)
    return api(local, "POST", f"/deployments/{found['id']}/create_flow_run", {"parameters": {"config": config}},
               timeout=timeout)["id"]


def complete_checkpoints(store: Path) -> list[Path]:
    return sorted(store.glob(f"**/checkpoints/checkpoint-*/{CHECKPOINT_MARKER}"))


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_state(local: LocalPrefect, run_id: str) -> str:
    return api(local, "GET", f"/flow_runs/{run_id}")["state"]["type"]


def run_summary(config: dict) -> dict:
    """The summary.json of the newest run folder of `config`."""
    return json.loads(sorted(Path(config["runs_dir"]).glob(f"{config['name']}/*/summary.json"))[-1].read_text())


def assert_resumed_and_published_once(config: dict) -> dict:
    summary = run_summary(config)
    assert summary["train"]["resumed_from_step"] >= 2 and summary["train"]["global_step"] == TRAIN_STEPS, summary["train"]
    assert summary["publish"]["published"], summary["publish"]
    merged = list((Path(config["store"]) / "publish").glob("*/model"))
    assert merged == [Path(summary["publish"]["model_dir"])], merged  # one merged model, not one per attempt
    return summary


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("faults-home")
    local = LocalPrefect(port=free_port(), home=home, log_dir=home / "logs")
    with local:
        local.ensure_pools()
        local.ensure_crash_detection(SILENT_SECONDS)
        deploy(local, "finetune")
        yield local
        stop_workers(local)  # (40 s of this module's teardown was its two workers' SIGTERM grace)


def test_worker_killed_mid_training_is_marked_crashed_and_the_rerun_resumes(server, tmp_path):
    config = training_config(tmp_path, "killed-worker")
    worker = psutil.Process(server.start_worker(CPU_POOL, name="doomed-worker").pid)
    run_id = start_run(server, config)
    wait_for(lambda: complete_checkpoints(Path(config["store"])), 600, "the run's first checkpoint")
    # The machine is lost: the worker and every process it started die at once, nobody reports anything.
    doomed = [worker, *worker.children(recursive=True)]
    assert len(doomed) > 1, "the worker started no run process"
    for process in doomed:
        process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert run_state(server, run_id) == "RUNNING"
    wait_for(lambda: run_state(server, run_id) == "CRASHED", 300, "the silent run to be marked Crashed", poll=2)
    print(f"marked Crashed {time.monotonic() - killed_at:.0f} s after its processes were killed")

    server.start_worker(CPU_POOL, name="replacement-worker")
    rerun = wait_for_terminal_state(server, start_run(server, config), timeout=600)
    assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
    assert_resumed_and_published_once(config)


def test_cancel_mid_training_ends_the_process_tree_and_the_rerun_resumes(server, tmp_path):
    config = training_config(tmp_path, "cancelled")
    server.start_worker(CPU_POOL, name="cancel-worker")
    run_id = start_run(server, config)
    wait_for(lambda: complete_checkpoints(Path(config["store"])), 600, "the run's first checkpoint")
    # Any of the module's live workers may have picked the run up: the run's processes are all their children.
    workers = [psutil.Process(process.pid) for name, process, _ in server.processes
               if name != "server" and process.poll() is None]
    run_processes = [child for worker in workers for child in worker.children(recursive=True)]
    assert run_processes, "the worker started no run process"
    # What the UI's Cancel button sends.
    api(server, "POST", f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}})
    cancelled_at = time.monotonic()
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in run_processes), 30,
             "the run's processes to end after Cancel")
    print(f"run processes ended {time.monotonic() - cancelled_at:.1f} s after Cancel")
    assert wait_for_terminal_state(server, run_id, timeout=60)["state"]["type"] == "CANCELLED"
    assert not list(Path(config["store"]).glob("locks/*.lock")), "the cancelled run left a lock behind"
    steps_done = max(int(marker.parent.name.split("-")[1]) for marker in complete_checkpoints(Path(config["store"])))

    rerun = wait_for_terminal_state(server, start_run(server, config), timeout=600)
    assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
    summary = assert_resumed_and_published_once(config)
    assert summary["train"]["resumed_from_step"] <= steps_done  # from a complete checkpoint, never a half-written one
