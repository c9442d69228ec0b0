"""A real `mlflow server` (SQLite backend, local artifact folder) on a free loopback port, for the tracking tests."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Running(str):
    """The server's URI, with `.stop()` (a test that takes the tracker away mid-run)."""

    process: subprocess.Popen

    def stop(self) -> None:
        stop(self.process)


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None):
    """Start the server with its database and artifacts under `root`; yields its URI (a str with .stop());
    stops it afterwards."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = Running(f"http://127.0.0.1:{port}")
    uri.process = server
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            raise RuntimeError((root / "server.log").read_text()[-2000:])
        if server.poll() is not None:
            raise RuntimeError((root / "server.log").read_text()[-2000:])
        yield uri
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """End the server and the workers it started (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=30)
