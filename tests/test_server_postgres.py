"""The same deployment end to end with PostgreSQL as the Prefect server's database."""

import subprocess

import pytest

from loraflow.ops.server import CPU_POOL, LocalPrefect
from tests.postgres import postgres_bin, running_postgres
from tests.test_server import api, free_port, small_config, wait_for_terminal_state

pytestmark = [pytest.mark.slow, pytest.mark.skipif(postgres_bin() is None, reason="Debian's postgresql is not installed")]


def test_deployment_runs_with_postgres_database(tmp_path):
    with running_postgres(free_port()) as database_url:
        local = LocalPrefect(port=free_port(), home=tmp_path / "home", database_url=database_url, log_dir=tmp_path / "logs")
        with local:
            local.ensure_pools()
            deployed = local.prefect("deploy", "--name", "prepare-only", check=False)
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            local.start_worker(CPU_POOL)
            deployment = api(local, "GET", "/deployments/name/prepare/prepare-only")
            run = api(local, "POST", f"/deployments/{deployment['id']}/create_flow_run",
                      {"parameters": {"config": small_config(tmp_path)}})
            finished = wait_for_terminal_state(local, run["id"])
            assert finished["state"]["type"] == "COMPLETED", finished["state"]
            # The run is in PostgreSQL's tables, not in a SQLite file.
            port = database_url.rsplit(":", 1)[1].split("/")[0]
            rows = subprocess.run(
                [str(postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "prefect", "-tAc",
                 f"select state_type from flow_run where id = '{run['id']}'"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            assert rows == "COMPLETED"
        assert not list((tmp_path / "home").glob("*.db"))
