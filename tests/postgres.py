"""A throwaway PostgreSQL server on a loopback port, from Debian's packages, for server tests."""

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def postgres_bin() -> Path | None:
    """Folder of initdb/pg_ctl from Debian's postgresql package, or None if it is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) if Path("/usr/lib/postgresql").exists() else []
    return versions[-1].parent if versions else None


@contextmanager
def running_postgres(port: int, password: str | None = None):
    """Start PostgreSQL (127.0.0.1:port) in a temp folder; yield its asyncpg URL; stop and delete.

    Trust auth, or with `password` the user `postgres` must give it over TCP (scram-sha-256; the URL holds none)."""
    with postgres_server(port, password) as (url, _):
        yield url


@contextmanager
def postgres_server(port: int, password: str | None = None):
    """As running_postgres, yielding (asyncpg URL, restart): restart() stops the server ('immediate': no
    shutdown checkpoint, as a crash) and starts it again on the same port and data."""
    bin_dir = postgres_bin()
    data = Path(tempfile.mkdtemp(prefix="loraflow-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses to run as root
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    env = {**os.environ, "PGPASSWORD": password} if password else None
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120, env=env)
    auth = ["--auth=trust"]
    if password:
        (data / "pw").write_text(password)
        if as_user:
            shutil.chown(data / "pw", "postgres", "postgres")
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={data / 'pw'}"]
    run(str(bin_dir / "initdb"), "-D", str(data / "db"), *auth, "-U", "postgres")
    start = lambda: run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-w", "-l", str(data / "log"),
                        "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {data}", "start")

    def restart(down_seconds: float = 5) -> None:
        run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop")
        time.sleep(down_seconds)
        start()

    start()
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", restart
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)
