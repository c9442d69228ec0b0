"""A local Prefect server plus a process worker, started and stopped together (`loraflow server`).

The server listens on 127.0.0.1 with SQLite by default (PostgreSQL when `database_url` is given); the
worker serves the `loraflow-cpu` work pool. Both are child processes stopped with SIGTERM. Any other
interface needs Prefect's basic auth: `PREFECT_SERVER_API_AUTH_STRING` ("user:password") from the
environment, never from the command line, so it shows in no process list, log or artifact.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.ops.automations import HEARTBEAT_SECONDS, SILENT_SECONDS

CPU_POOL = "loraflow-cpu"
GPU_POOL = "loraflow-gpu"
REPO = Path(__file__).resolve().parents[2]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"


def exposure_problem(host: str, environ: dict) -> str | None:
    """Why serving on `host` is refused (a non-loopback interface without an auth string), else None."""
    if host in LOOPBACK_HOSTS or environ.get(AUTH_ENV):
        return None
    return (f"refusing to listen on {host} without authentication: set {AUTH_ENV}='user:password' in the "
            f"environment (Prefect's basic auth), or keep the default --host 127.0.0.1")


def client_host(host: str) -> str:
    """The address local clients use to reach a server bound to `host`."""
    return "127.0.0.1" if host in LOOPBACK_HOSTS | {"0.0.0.0", "::"} else host


def prefect_env(port: int, home: Path | None = None, database_url: str | None = None,
                host: str = "127.0.0.1") -> dict:
    """Environment for the server, the worker and every client talking to them."""
    env = dict(os.environ)
    api_url = f"http://{client_host(host)}:{port}/api"
    env.update({
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "LORAFLOW_REPO": str(REPO),
        # Runs send a heartbeat every 30 s; the crash-detection automation marks a silent one Crashed.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS)),
        # A server whose database is restarting answers 500: clients (worker, runs) retry it as they retry a
        # 502/503, with backoff (about a minute in all), instead of failing the run.
        "PREFECT_CLIENT_RETRY_EXTRA_CODES": env.get("PREFECT_CLIENT_RETRY_EXTRA_CODES", "500"),
        # Schedule new runs within seconds of a deploy rather than at the next minute's loop.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": env.get("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "10"),
    })
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    if env.get(AUTH_ENV):
        env["PREFECT_API_AUTH_STRING"] = env[AUTH_ENV]  # the worker and the CLI authenticate with it
    return env


def record_api_url(api_url: str) -> str | None:
    """Write PREFECT_API_URL into the active Prefect profile (profiles.toml in PREFECT_HOME), so `prefect ...` in
    another shell talks to this server instead of starting a temporary one on the same SQLite file ("database is
    locked"); returns the value it replaced, for `restore_api_url`."""
    from prefect.settings import PREFECT_API_URL, load_current_profile, update_current_profile

    previous = load_current_profile().settings.get(PREFECT_API_URL)
    update_current_profile({PREFECT_API_URL: api_url})
    return previous


def restore_api_url(previous: str | None) -> None:
    """Put the profile's PREFECT_API_URL back as it was before `record_api_url` (removed when there was none)."""
    from prefect.settings import PREFECT_API_URL, update_current_profile

    update_current_profile({PREFECT_API_URL: previous})


@dataclass
class LocalPrefect:
    """A running local Prefect server (and optionally a worker), as a context manager."""

    port: int = 4200
    host: str = "127.0.0.1"
    home: Path | None = None
    database_url: str | None = None
    log_dir: Path = field(default_factory=lambda: Path(".loraflow/server"))
    processes: list = field(default_factory=list)

    @property
    def env(self) -> dict:
        return prefect_env(self.port, self.home, self.database_url, self.host)

    @property
    def api_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.port}/api"

    def start_server(self, timeout: float = 120) -> None:
        """Start `prefect server start` and wait until /api/health answers; refuse an unauthenticated exposure."""
        problem = exposure_problem(self.host, os.environ)
        if problem:
            raise PermissionError(problem)
        self._spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", self.host,
                               "--port", str(self.port), "--analytics-off"])
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.healthy():
                return
            if self.processes[-1][1].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"Prefect server did not become healthy on port {self.port}; see {self.log_dir / 'server.log'}")

    def client(self, timeout: float = 60):
        """Prefect's own synchronous client for this server (`with local.client() as client: ...`), authenticated
        as the CLI and the worker are (PREFECT_API_AUTH_STRING from the environment)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url, auth_string=self.env.get("PREFECT_API_AUTH_STRING"),
                                 httpx_settings={"timeout": timeout})

    def healthy(self) -> bool:
        """Whether the server answers its health check."""
        with self.client(timeout=2) as client:
            return client.api_healthcheck() is None

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `prefect` CLI command against this server."""
        return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, check=check, timeout=300)

    def ensure_pools(self) -> None:
        """Create the CPU and GPU process work pools if they are missing, with the process worker's default job
        template (what `prefect work-pool create --type process` sends). Through the API: each `prefect work-pool`
        command is a Python start that imports all of Prefect (about 10 s of CPU), and this took four of them."""
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound
        from prefect.workers.process import ProcessWorker

        with self.client() as client:
            for pool in (CPU_POOL, GPU_POOL):
                try:
                    client.read_work_pool(pool)
                except ObjectNotFound:
                    client.create_work_pool(WorkPoolCreate(
                        name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))

    def ensure_crash_detection(self, silent_seconds: int = SILENT_SECONDS) -> None:
        """Create the automation that marks runs silent for `silent_seconds` Crashed (loraflow.ops.automations)."""
        subprocess.run([sys.executable, "-m", "loraflow.cli.commands", "detect-crashed-runs", "--silent-seconds", str(silent_seconds)],
                       env=self.env, cwd=REPO, capture_output=True, text=True, check=True, timeout=120)

    def start_worker(self, pool: str = CPU_POOL, name: str | None = None, limit: int | None = None) -> subprocess.Popen:
        """Start a process worker polling `pool` (in its own process group, with the runs it starts), running at
        most `limit` runs at once (no bound when None); return it."""
        name = name or f"worker-{pool}"
        self._spawn(name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name,
                           "--type", "process", "--prefetch-seconds", "5", *(["--limit", str(limit)] if limit else [])])
        return self.processes[-1][1]

    def stop(self) -> None:
        """SIGTERM every child (worker first), then SIGKILL what is still alive after 20 s."""
        for _, process, _ in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, log in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
        self.processes.clear()

    def _spawn(self, name: str, command: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(command, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((name, process, log))

    def __enter__(self):
        self.start_server()
        return self

    def __exit__(self, *exc):
        self.stop()
