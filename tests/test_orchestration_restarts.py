"""The Prefect server or its database killed and restarted during a run, against a real server and process worker
started here: the run finishes and its state reaches the server (the two server restarts carry the `soak` mark:
`make test-all`). With PostgreSQL as the server's database, the run's state is read back from PostgreSQL's own
tables and no SQLite file is made (this was tests/test_server_postgres.py's own server and run: the deployment end to
end on PostgreSQL). Worker kills and Cancel: tests/test_orchestration_faults.py."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loraflow.ops.server import CPU_POOL, LocalPrefect
from tests.test_orchestration_faults import complete_checkpoints, run_summary, start_run, training_config, wait_for
from tests.test_server import api, deploy, free_port, stop_workers, wait_for_terminal_state

pytestmark = pytest.mark.slow

# Still training after the first checkpoint (step 2) through the 10 s outage and the restart.
TRAIN_STEPS = 40


def restart_server(local: LocalPrefect, down_seconds: float) -> None:
    """Kill the Prefect server's process group (SIGKILL: a crash, no shutdown), wait, start it again."""
    name, process, log = next(entry for entry in local.processes if entry[0] == "server")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    log.close()
    local.processes.remove((name, process, log))
    time.sleep(down_seconds)
    local.start_server()


@pytest.mark.parametrize("fault", [
    pytest.param("sqlite server restarted", marks=pytest.mark.soak),  # minutes each: `make test-all`
    pytest.param("postgresql server restarted", marks=pytest.mark.soak),
    "postgresql database restarted",  # the one that failed a run before the client retried 500s
])
def test_a_run_survives_its_server_or_database_restarting_mid_training(tmp_path, fault):
    from contextlib import ExitStack

    from tests.postgres import postgres_bin, postgres_server

    if "postgresql" in fault and postgres_bin() is None:
        pytest.skip("Debian's postgresql is not installed")
    config = training_config(tmp_path, "restarted", steps=TRAIN_STEPS)
    with ExitStack() as stack:
        database_url, restart_database = (stack.enter_context(postgres_server(free_port())) if "postgresql" in fault
                                          else (None, None))
        local = stack.enter_context(LocalPrefect(port=free_port(), home=tmp_path / "home", database_url=database_url,
                                                 log_dir=tmp_path / "logs"))
        stack.callback(stop_workers, local)  # before the server's stop (tests/test_server.py says why)
        local.ensure_pools()
        deploy(local, "finetune")
        local.start_worker(CPU_POOL)
        run_id = start_run(local, config)
        wait_for(lambda: complete_checkpoints(Path(config["store"])), 600, "the run's first checkpoint")
        if fault.endswith("database restarted"):
            restart_database(down_seconds=10)
        else:
            restart_server(local, down_seconds=10)
        finished = wait_for_terminal_state(local, run_id, timeout=600)
        assert finished["state"]["type"] == "COMPLETED", finished["state"]
        summary = run_summary(config)
        assert summary["train"]["global_step"] == TRAIN_STEPS and summary["train"]["resumed_from_step"] is None
        assert summary["publish"]["published"]
        task_runs = api(local, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        states = sorted(run["state"]["type"] for run in task_runs)
        assert states and set(states) == {"COMPLETED"}, states  # every stage's end reached the server
        artifacts = api(local, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        keys = [artifact["key"] for artifact in artifacts if artifact["key"]]
        assert "restarted-summary" in keys and len(keys) == len(set(keys)), keys  # reached the server, once each
        if database_url:  # the run is in PostgreSQL's tables, not in a SQLite file
            port = database_url.rsplit(":", 1)[1].split("/")[0]
            rows = subprocess.run(
                [str(postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "prefect", "-tAc",
                 f"select state_type from flow_run where id = '{run_id}'"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            assert rows == "COMPLETED", rows
    if database_url:
        assert not list((tmp_path / "home").glob("*.db"))
