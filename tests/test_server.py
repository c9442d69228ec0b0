"""Operations on a real Prefect server: pools, `prefect deploy --all`, a worker, runs triggered through the
API exactly as the UI does, caching across runs, schedules, and the Prefect UI seen in a real browser (Debian's
headless Chromium: a run's artifacts and the typed form; on this module's server, which it used to start for itself
in tests/test_browser.py). SQLite here; PostgreSQL: tests/test_orchestration_restarts.py."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loraflow.ops.server import CPU_POOL, GPU_POOL, LocalPrefect

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


BUSY_ANSWERS: list[str] = []  # every 503 (database busy) or unanswered read, retried as Prefect's clients do


def api(local: LocalPrefect, method: str, path: str, body: dict | None = None, timeout: float = 30):
    request = urllib.request.Request(
        f"{local.api_url}{path}", method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 5:
                raise
            BUSY_ANSWERS.append(f"{method} {path}")
            time.sleep(2 ** attempt)
        except TimeoutError:
            if method != "GET" or attempt == 5:  # a read is safe to ask again; a POST may have been carried out
                raise
            BUSY_ANSWERS.append(f"{method} {path} (no answer in {timeout} s)")


def wait_for_terminal_state(local: LocalPrefect, flow_run_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = api(local, "GET", f"/flow_runs/{flow_run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout} s; see the worker log")


def deploy(local: LocalPrefect, name: str | None = None) -> None:
    """`prefect deploy` of one deployment of prefect.yaml (every one when `name` is None); it must succeed."""
    deployed = local.prefect("deploy", *(["--name", name] if name else ["--all"]), check=False)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr


def stop_workers(local: LocalPrefect) -> None:
    """SIGKILL the process group of each worker that `local` started (the worker and any run it started) before the
    server's own stop. Sent SIGTERM beside its server, a worker that had served runs kept retrying the server until
    LocalPrefect.stop's 20 s grace ran out (20 s of this module's teardown, 40 s of test_orchestration_faults' with
    two workers); no test depends on a worker's graceful end."""
    for name, process, _ in local.processes:
        if name != "server" and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    local = LocalPrefect(port=free_port(), home=home, log_dir=home / "logs")
    with local:
        local.ensure_pools()
        deploy(local)
        local.start_worker(CPU_POOL)
        yield local
        stop_workers(local)


def small_config(tmp_path: Path) -> dict:
    repo = Path(__file__).resolve().parent.parent
    return {
        "name": "server-test",
        "base_dir": str(repo / "configs"),
        "store": str(tmp_path / "store"),
        "runs_dir": str(tmp_path / "runs"),
        "sources": [{"kind": "csv", "name": "anime_catalog", "path": "../data/sample/anime_catalog.csv", "max_rows": 8}],
    }


def test_deployments_have_typed_forms_and_schedule(server):
    deployments = {d["name"]: d for d in api(server, "POST", "/deployments/filter", {})}
    assert {"finetune", "anime-nightly", "prepare-only", "finetune-gpu"} <= set(deployments)
    schema = deployments["finetune"]["parameter_openapi_schema"]
    config_schema = json.dumps(schema)
    assert "Hub repo id or local folder" in config_schema  # field descriptions reach the UI form
    for title in ("CSV file", "JSON / JSONL file", "Hugging Face dataset", "Parquet file", "SQL query"):
        assert f'"title": "{title}"' in config_schema  # the source-kind selector names each kind
    assert deployments["anime-nightly"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert deployments["anime-nightly"]["schedules"][0]["schedule"]["timezone"] == "Asia/Tokyo"
    # anime-on-data retrains when an upstream materializes the demo's catalog (the key loraflow gives that source)
    from loraflow.ops.assets import MATERIALIZED_EVENT, source_asset_key

    catalog = Path(__file__).resolve().parent.parent / "data/sample/anime_catalog.csv"
    (trigger,) = [a["trigger"] for a in api(server, "POST", "/automations/filter", {})
                  if any(action.get("deployment_id") == deployments["anime-on-data"]["id"] for action in a["actions"])]
    assert trigger["expect"] == [MATERIALIZED_EVENT]
    assert trigger["match"]["prefect.resource.id"] == source_asset_key(str(catalog), catalog)


def test_ui_style_run_on_worker_then_cached(server, tmp_path):
    deployment = api(server, "GET", "/deployments/name/prepare/prepare-only")
    parameters = {"config": small_config(tmp_path)}
    summaries = []
    for _ in range(2):
        run = api(server, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})
        finished = wait_for_terminal_state(server, run["id"])
        assert finished["state"]["type"] == "COMPLETED", finished["state"]
        summaries.append(sorted((tmp_path / "runs" / "server-test").glob("*/summary.json"))[-1])
    first, second = (json.loads(path.read_text()) for path in summaries)
    assert not first["all_cached"] and second["all_cached"]


def test_invalid_parameters_rejected_before_a_run(server, tmp_path):
    deployment = api(server, "GET", "/deployments/name/prepare/prepare-only")
    bad = {"config": {**small_config(tmp_path), "tokenize": {"max_length": 3}}}
    with pytest.raises(urllib.error.HTTPError) as error:
        api(server, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": bad})
    assert error.value.code in (409, 422)


def test_cron_schedule_creates_runs(server):
    """The scheduler turns anime-nightly's cron into scheduled runs (it silently did not with SQLAlchemy 2.1)."""
    deployment = api(server, "GET", "/deployments/name/finetune/anime-nightly")
    deadline, scheduled = time.time() + 150, []
    while time.time() < deadline and not scheduled:
        scheduled = api(server, "POST", "/flow_runs/filter", {
            "deployments": {"id": {"any_": [deployment["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        })
        time.sleep(3)
    assert scheduled, "no scheduled runs were created for anime-nightly"
    starts = sorted(run["next_scheduled_start_time"] or run["expected_start_time"] for run in scheduled)
    assert all("T18:00:00" in start for start in starts)  # 03:00 in Asia/Tokyo is 18:00 UTC


def test_pools_are_made_once_through_prefects_client(server):
    server.ensure_pools()  # the fixture made them: this finds both and creates nothing
    with server.client() as client:
        pools = {pool.name: pool for pool in client.read_work_pools()}
    assert pools[CPU_POOL].type == pools[GPU_POOL].type == "process"
    assert "job_configuration" in pools[GPU_POOL].base_job_template
    assert server.healthy()


def test_a_server_that_is_not_there_is_not_healthy():
    assert not LocalPrefect(port=free_port()).healthy()


# ---- the UI in a real browser ---------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"
SOURCE_TITLES = ("CSV file", "JSON / JSONL file", "Hugging Face dataset", "Parquet file", "SQL query")


def render(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM of `url` after its scripts ran (and optionally a PNG of it)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
    if screenshot is not None:
        subprocess.run(["chromium", *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="apt-get install chromium")
def test_run_page_artifacts_and_form_in_chromium(server, tmp_path):
    local = server
    deployment = api(local, "GET", "/deployments/name/prepare/prepare-only")
    run = api(local, "POST", f"/deployments/{deployment['id']}/create_flow_run",
              {"parameters": {"config": small_config(tmp_path)}})
    assert wait_for_terminal_state(local, run["id"])["state"]["type"] == "COMPLETED"
    ui = f"http://127.0.0.1:{local.port}"
    keep = os.environ.get("LORAFLOW_UPDATE_SCREENSHOTS") == "1"

    run_page = render(f"{ui}/runs/flow-run/{run['id']}", tmp_path / "chrome",
                      DOCS / "prefect-run.png" if keep else tmp_path / "run.png")
    assert "Completed" in run_page and "tokenize" in run_page

    artifacts = api(local, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keys = {artifact["key"] for artifact in artifacts}
    assert {"server-test-synthesize", "server-test-format", "server-test-tokenize"} <= keys
    tokenize = next(a for a in artifacts if a["key"] == "server-test-tokenize")
    artifact_page = render(f"{ui}/artifacts/artifact/{tokenize['id']}", tmp_path / "chrome",
                           DOCS / "prefect-artifact.png" if keep else None)
    assert "rows quarantined" in artifact_page

    form = render(f"{ui}/deployments/deployment/{deployment['id']}/run", tmp_path / "chrome")
    assert "Hub repo id or local folder" in form and "Run name" in form
    # The default UI shows each source as JSON; Prefect's V2 UI (/v2) renders the sources' union as a kind
    # selector named by each source config's title. The docs screenshot is that form.
    form_v2 = render(f"{ui}/v2/deployments/deployment/{deployment['id']}/run", tmp_path / "chrome",
                     DOCS / "prefect-run-form.png" if keep else None)
    assert all(title in form_v2 for title in SOURCE_TITLES), [t for t in SOURCE_TITLES if t not in form_v2]
    assert ">Config<" not in form_v2  # no option is the bare class name
