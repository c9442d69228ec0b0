"""The artifact store under a crash and a full disk.

kill -9 of a real writer process in the middle of ArtifactStore.write (paused at an fsync, then killed): the
half-written artifact is never used, its temp file is removed by the next write, and the artifact written
before it is intact. A full disk (a file-size limit, and a small tmpfs where this machine can mount one):
one clear error that names the path and says the disk is full, no partial file, earlier artifacts intact.
"""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore, table_bytes

REPO = Path(__file__).resolve().parent.parent

# Writes a previous artifact, then a new one; with a pause point it stops inside the new write's Nth fsync
# (1: the Parquet temp file, 2: the manifest temp file) and waits there to be killed.
WRITER = """
import os, sys
import pandas as pd
from loraflow.runtime.artifact_store import ArtifactStore
from tests.test_reliability_store import new_frame
root, pause_at_fsync = sys.argv[1], int(sys.argv[2])
store = ArtifactStore(root)
previous = store.write(pd.DataFrame({"v": [1, 2, 3]}), stage="s", contract="c", schema_version=1, config_hash="h")
print("PREVIOUS", previous.model_dump_json(), flush=True)
real_fsync, calls = os.fsync, [0]
def fsync_then_wait(fd):
    real_fsync(fd)
    calls[0] += 1
    if calls[0] == pause_at_fsync:
        print("PAUSED", flush=True)
        sys.stdin.read()  # until killed
os.fsync = fsync_then_wait
store.write(new_frame(), stage="s", contract="c", schema_version=1, config_hash="h")
print("DONE", flush=True)
"""

# Same previous artifact, then a new one bigger than the limit the caller sets on this process's files.
FULL_DISK_WRITER = """
import resource, signal, sys
import pandas as pd
from loraflow.runtime.artifact_store import ArtifactStore, DiskFullError
from tests.test_reliability_store import new_frame
root, file_size_limit = sys.argv[1], int(sys.argv[2])
store = ArtifactStore(root)
previous = store.write(pd.DataFrame({"v": [1, 2, 3]}), stage="s", contract="c", schema_version=1, config_hash="h")
print("PREVIOUS", previous.model_dump_json(), flush=True)
if file_size_limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
try:
    store.write(new_frame(), stage="s", contract="c", schema_version=1, config_hash="h")
except DiskFullError as error:
    print("DISKFULL", error.strerror, flush=True)
    sys.exit(3)
"""


def new_frame() -> pd.DataFrame:
    """~400 kB of incompressible bytes: bigger than the limits below, written in more than one piece."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({"blob": [rng.bytes(100_000) for _ in range(4)]})


def new_ref(root: Path) -> ArtifactRef:
    """The reference the interrupted write would have returned (the store names files by content)."""
    sha = hashlib.sha256(table_bytes(new_frame())).hexdigest()
    return ArtifactRef(uri=f"{root}/artifacts/s/{sha}.parquet", sha256=sha, rows=4, contract="c", schema_version=1,
                       stage="s", config_hash="h")


def python(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def previous_ref(line: str) -> ArtifactRef:
    assert line.startswith("PREVIOUS "), line
    return ArtifactRef.model_validate_json(line.split(" ", 1)[1])


def temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "artifacts" / "s").iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("pause_at_fsync, killed_while", [(1, "writing the parquet file"), (2, "writing the manifest")])
def test_kill_9_during_an_artifact_write(tmp_path, pause_at_fsync, killed_while):
    writer = python(WRITER, tmp_path, pause_at_fsync)
    previous = previous_ref(writer.stdout.readline().strip())
    assert writer.stdout.readline().strip() == "PAUSED", writer.stderr.read()
    writer.send_signal(signal.SIGKILL)
    writer.wait()  # reaped: its pid no longer exists
    assert writer.returncode == -signal.SIGKILL

    store, interrupted = ArtifactStore(tmp_path), new_ref(tmp_path)
    assert len(temp_files(tmp_path)) == 1, f"the kill while {killed_while} should leave its temp file"
    assert not store.is_valid(interrupted)  # no manifest: never used
    assert Path(interrupted.uri).exists() == (pause_at_fsync == 2)  # the Parquet file was already in place
    assert store.read(previous)["v"].tolist() == [1, 2, 3]

    rewritten = store.write(new_frame(), stage="s", contract="c", schema_version=1, config_hash="h")
    assert rewritten.sha256 == interrupted.sha256 and store.is_valid(rewritten)
    assert temp_files(tmp_path) == [], "the next write removes a dead writer's temp file"
    assert store.read(previous)["v"].tolist() == [1, 2, 3]


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    writer = python(WRITER, tmp_path, 1)
    previous_ref(writer.stdout.readline().strip())
    assert writer.stdout.readline().strip() == "PAUSED"
    try:
        ArtifactStore(tmp_path).write(pd.DataFrame({"v": [9]}), stage="s", contract="c", schema_version=1, config_hash="h")
        assert len(temp_files(tmp_path)) == 1  # still being written by a process that is alive
    finally:
        writer.kill()
        writer.wait()


def check_disk_full(root: Path, writer: subprocess.Popen) -> None:
    out, err = writer.communicate(timeout=120)
    lines = out.strip().splitlines()
    previous = previous_ref(lines[0])
    assert writer.returncode == 3, out + err
    message = lines[1]
    interrupted = new_ref(root)
    assert message.startswith("DISKFULL disk full writing ") and interrupted.uri in message, message
    assert "free space" in message
    assert temp_files(root) == [] and not Path(interrupted.uri).exists(), "no partial file is left"
    assert ArtifactStore(root).read(previous)["v"].tolist() == [1, 2, 3]


def test_file_size_limit_gives_a_clear_error_and_leaves_no_partial_file(tmp_path):
    check_disk_full(tmp_path, python(FULL_DISK_WRITER, tmp_path, 64_000))


def test_full_tmpfs_gives_a_clear_error_and_leaves_no_partial_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'}); the file-size limit test covers this")
    try:
        check_disk_full(disk, python(FULL_DISK_WRITER, disk, 0))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
