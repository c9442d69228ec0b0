"""Issue 20 item 6: `loraflow server` on another interface than loopback needs Prefect's basic auth; a real
server started with an auth string refuses unauthenticated API calls, and the secret reaches no log."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loraflow.ops.server import AUTH_ENV, LocalPrefect, exposure_problem

REPO = Path(__file__).resolve().parent.parent
SECRET = "operator:s3cret-not-in-logs-7f3a"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def status_of(url: str, headers: dict | None = None, body: dict | None = None) -> int:
    request = urllib.request.Request(url, method="POST" if body is not None else "GET", headers=headers or {},
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_exposure_rule():
    assert exposure_problem("127.0.0.1", {}) is None
    assert exposure_problem("0.0.0.0", {AUTH_ENV: SECRET}) is None
    problem = exposure_problem("0.0.0.0", {})
    assert problem and AUTH_ENV in problem


def test_cli_refuses_public_interface_without_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    env.update(PREFECT_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "loraflow.cli.commands", "server", "--host", "0.0.0.0", "--no-deploy",
                           "--port", str(free_port())], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert AUTH_ENV in done.stderr


def test_server_on_all_interfaces_refuses_unauthenticated(tmp_path, monkeypatch):
    monkeypatch.setenv(AUTH_ENV, SECRET)
    local = LocalPrefect(port=free_port(), host="0.0.0.0", home=tmp_path / "home", log_dir=tmp_path / "logs")
    with local:
        url = f"{local.api_url}/flows/filter"
        good = {"Authorization": "Basic " + base64.b64encode(SECRET.encode()).decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"operator:wrong").decode()}
        assert status_of(url, body={}) == 401
        assert status_of(url, bad, body={}) == 401
        assert status_of(url, good, body={}) == 200
        # the Prefect CLI (as the worker does) authenticates through PREFECT_API_AUTH_STRING in the env
        listed = local.prefect("work-pool", "ls", check=False)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert SECRET not in listed.stdout + listed.stderr
    for log in (tmp_path / "logs").iterdir():
        assert SECRET not in log.read_text(errors="replace"), log


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="apt-get install chromium")
def test_ui_in_chromium_asks_for_login(tmp_path, monkeypatch):
    from tests.test_server import render

    monkeypatch.setenv(AUTH_ENV, SECRET)
    local = LocalPrefect(port=free_port(), host="0.0.0.0", home=tmp_path / "home", log_dir=tmp_path / "logs")
    with local:
        dom = render(f"http://127.0.0.1:{local.port}/dashboard", tmp_path / "profile")
    assert 'type="password"' in dom and "Login" in dom
    assert SECRET not in dom
