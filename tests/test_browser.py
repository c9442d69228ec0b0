"""The Prefect UI, seen in a real browser (Debian's headless Chromium): a run's artifacts and the typed form."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from loraflow.ops.server import CPU_POOL, LocalPrefect
from tests.test_server import api, free_port, small_config, wait_for_terminal_state

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="apt-get install chromium")]
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


def test_run_page_artifacts_and_form_in_chromium(tmp_path):
    local = LocalPrefect(port=free_port(), home=tmp_path / "home", log_dir=tmp_path / "logs")
    with local:
        local.ensure_pools()
        assert local.prefect("deploy", "--name", "prepare-only", check=False).returncode == 0
        local.start_worker(CPU_POOL)
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
