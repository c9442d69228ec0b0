"""`loraflow schedule CONFIG --cron | --on-data` against a real Prefect server: a deployment of the user's own config
whose relative folders are absolute against the config's folder, updated in place when scheduled again, listed by
`loraflow schedules`; the server makes scheduled runs of it; with --on-data a stand-in upstream ETL flow that
materializes the source starts a retrain by itself, which reads the new rows and materializes the model's asset
with the source as its upstream (these two on one server of this module). `loraflow server` records its API URL for
other shells."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraflow.ops.server import LocalPrefect
from tests.test_server import api, free_port, stop_workers

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def loraflow(local: LocalPrefect, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**local.env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "loraflow.cli.commands", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the --cron and --on-data tests (a server start is tens of seconds on a busy machine). Each test
    leaves no worker and no scheduled run behind for the other: the --cron test deletes its deployment (and with it
    its scheduled runs) and the --on-data test stops the worker it started."""
    home = tmp_path_factory.mktemp("schedule-home")
    local = LocalPrefect(port=free_port(), home=home, log_dir=home / "logs")
    with local:
        local.ensure_pools()
        yield local


def test_a_config_on_a_schedule_keeps_its_own_folders(server, tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "catalog.csv").write_bytes((REPO / "data/sample/anime_catalog.csv").read_bytes())
    config = project / "nightly.yaml"
    config.write_text("name: my-nightly\nstore: store\nruns_dir: runs\n"
                      "sources:\n  - {kind: csv, name: catalog, path: data/catalog.csv, max_rows: 8}\n")
    elsewhere = tmp_path / "elsewhere"  # the shell the user types in is not the config's folder
    elsewhere.mkdir()
    local = server
    made = loraflow(local, elsewhere, "schedule", str(config), "--cron", "0 3 * * *", "--timezone", "Asia/Tokyo")
    assert made.returncode == 0, made.stderr[-3000:]
    again = loraflow(local, elsewhere, "schedule", str(config), "--cron", "* * * * *")  # updated, not doubled
    assert again.returncode == 0, again.stderr[-3000:]
    deployments = [d for d in api(local, "POST", "/deployments/filter", {}) if d["name"] == "my-nightly-schedule"]
    listed = loraflow(local, elsewhere, "schedules")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = api(local, "POST", "/flow_runs/filter",
                       {"deployments": {"id": {"any_": [deployments[0]["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
            if runs:
                break
            time.sleep(2)
    finally:  # its scheduled runs (one a minute) go with it: no worker of this module's server may pick one up
        for made_deployment in deployments:
            api(local, "DELETE", f"/deployments/{made_deployment['id']}")
    (deployment,) = deployments
    assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"
    parameters = deployment["parameters"]["config"]
    assert parameters["store"] == str(project / "store") and parameters["runs_dir"] == str(project / "runs")
    assert parameters["base_dir"] == str(project) and parameters["sources"][0]["path"] == "data/catalog.csv"
    assert "Hub repo id or local folder" in str(deployment["parameter_openapi_schema"])  # the typed form stays
    assert "finetune/my-nightly-schedule" in listed.stdout and "* * * * *" in listed.stdout, listed.stderr[-2000:]
    assert runs, "the server scheduled no run of the deployment"


def test_loraflow_server_records_its_api_url_for_other_shells_until_it_stops(tmp_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "loraflow.cli.commands", "server", "--port", str(port), "--no-deploy"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        printed = [server.stdout.readline() for _ in range(2)]  # the UI line, then the PREFECT_API_URL line
        shell = subprocess.run([sys.executable, "-m", "prefect", "config", "view"], env=env, capture_output=True,
                               text=True, timeout=120)  # another shell: no PREFECT_API_URL in its environment
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    url = f"http://127.0.0.1:{port}/api"
    assert f"PREFECT_API_URL={url} is set in your Prefect profile" in printed[1], printed
    assert f"PREFECT_API_URL='{url}' (from profile)" in shell.stdout, shell.stdout
    after = subprocess.run([sys.executable, "-m", "prefect", "config", "view"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert "PREFECT_API_URL" not in after.stdout  # put back as it was when the server stops


ETL = '''
import sys
from prefect import flow
from prefect.assets import materialize

@materialize(sys.argv[2])
def write_table():
    lines = open(sys.argv[3]).read().splitlines(keepends=True)
    open(sys.argv[1], "w").write("".join(lines[:7]))  # the header and 6 rows: 2 more than before

@flow(name="upstream-etl")
def etl():
    write_table()

etl()
'''


def test_retrained_when_the_data_lands_and_the_model_asset_names_its_source(server, tmp_path):
    from loraflow.ops.assets import source_asset_key
    from tests.test_automation import wait_for_events
    from tests.test_server import wait_for_terminal_state
    from tests.tiny_llama import build_tiny_llama

    sample = REPO / "data/sample/anime_catalog.csv"
    project = tmp_path / "project"
    project.mkdir()
    table = project / "catalog.csv"
    table.write_text("".join(sample.read_text().splitlines(keepends=True)[:5]))  # the header and 4 rows
    config = project / "landed.yaml"
    config.write_text(f"""name: landed
model: {{base: {build_tiny_llama(tmp_path / 'tiny-llama')}}}
store: store
runs_dir: runs
sources: [{{kind: csv, name: catalog, path: catalog.csv}}]
train: {{max_steps: 1, micro_batch_size: 4, gradient_checkpointing: false}}
eval: {{max_questions: 2, max_new_tokens: 4, general_questions: ["What is 2 + 2?"], general_max_new_tokens: 4,
       gate: {{min_fact_accuracy: 0.0, min_stop_rate: 0.0, must_beat_base: false, min_natural_fact_accuracy: null,
              min_refusal_rate: null, max_general_regressions: null}}}}
""")
    key = source_asset_key(str(table), table)
    local = server
    made = loraflow(local, project, "schedule", str(config), "--on-data")
    assert made.returncode == 0 and key in made.stdout, made.stdout + made.stderr[-3000:]
    local.start_worker()
    try:
        etl = subprocess.run([sys.executable, "-c", ETL, str(table), key, str(sample)], env={**local.env, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=300)
        assert etl.returncode == 0, etl.stderr[-3000:]
        deployment = api(local, "GET", "/deployments/name/finetune/landed-schedule")
        deadline, runs = time.time() + 120, []
        while time.time() < deadline and not runs:  # the trigger creates the run by itself
            runs = api(local, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
            time.sleep(2)
        assert runs, "the materialized source did not trigger a run"
        finished = wait_for_terminal_state(local, runs[0]["id"], timeout=600)
        deadline, model = time.time() + 60, []
        while time.time() < deadline and not model:  # the server stores events in batches
            model = [e for e in wait_for_events(local, "prefect.asset.materialization.succeeded")
                     if e["resource"]["prefect.resource.id"] == "loraflow://models/landed"]
            time.sleep(1)
    finally:  # no worker left for the --cron test's deployment
        stop_workers(local)
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    (summary_path,) = (project / "runs" / "landed").glob("*/summary.json")
    summary = __import__("json").loads(summary_path.read_text())
    assert summary["sources"][0]["rows"] == 6 and summary["publish"]["version"] == 1  # it read the new rows
    (model,) = model
    assert model["payload"]["version"] == 1 and model["payload"]["sources"][0]["rows"] == 6
    assert {"prefect.resource.id": key, "prefect.resource.role": "asset"} in model["related"]
