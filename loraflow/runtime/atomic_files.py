"""Atomic writes of local files and folders: every writer stages beside the target, then renames into place.

    write_json_atomic(output_dir / "metrics.json", metrics)       # json.dumps(indent=1, default=str)
    write_text_atomic(output_dir / "eval_report.md", report)
    with atomic_file(folder / "model.gguf") as partial:           # any writer (pandas, gguf, a tool) fills `partial`
        writer.write(partial)
    with atomic_folder(adapter_dir) as staging:                   # save_pretrained(staging), manifest last
        model.save_pretrained(staging)

A reader sees the old file or folder or the new one, never half of one and never none: a file is fsynced and
renamed over the old one; a folder is swapped with the old one in one rename (Linux `renameat2(RENAME_EXCHANGE)`),
and the old one, now at the staging name, is removed after. Where the file system cannot exchange (not Linux, some
network file systems), the old folder is renamed aside and the new one in: two renames, an instant apart. An error
inside the `with` leaves the target as it was and removes what was staged. Temp names hold the writer's pid and a
random part, so two writers of one path (processes or threads) never share one, and the next write of a path
removes what a killed writer on this host left (its pid is gone). Artifacts in an object store are
written whole by the store (loraflow.runtime.artifact_store), which uses `atomic_file` for a local store.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import socket
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_file(path: str | Path, *, temp_prefix: str | None = None) -> Iterator[Path]:
    """A temp path beside `path` (parent folders made) for the body to write; on a clean exit it is fsynced and
    renamed onto `path`, on an error removed. `temp_prefix` names it (default `.<name>.<host>.<pid>.`, whose dead
    writers' leftovers are removed here; a caller with its own prefix removes its own, as the artifact store does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temp_prefix is None:
        _remove_dead_writers_leftovers(path, ".part")
    temp = path.with_name(f"{temp_prefix or _temp_prefix(path)}{uuid.uuid4().hex[:12]}.part")
    try:
        yield temp
        with open(temp, "rb+") as written:  # whoever wrote it may not have synced it
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """An empty staging folder beside `path` for the body to fill; on a clean exit it takes `path`'s place (the old
    folder, if any, swapped out and then removed), on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_leftovers(path, ".staging")
    staging = path.with_name(f"{_temp_prefix(path)}{uuid.uuid4().hex[:12]}.staging")
    staging.mkdir()
    try:
        yield staging
        replace_folder(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the old folder


def replace_folder(new: Path, path: Path) -> None:
    """Put folder `new` at `path`; a folder already there ends up at `new`'s name, for the caller to remove."""
    try:
        os.rename(new, path)  # nothing there yet (or an empty folder): one rename
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not _exchange(new, path):
        aside = new.with_name(new.name + ".old")
        os.rename(path, aside)
        os.rename(new, path)
        os.rename(aside, new)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` (parent folders made); returns the path."""
    with atomic_file(path) as temp:
        temp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, payload, *, indent: int = 1) -> Path:
    """`payload` as JSON (values JSON cannot hold are written as str()) to `path`; returns the path."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=str))


# ---- temp names: .<name>.<host>.<pid>.<random><suffix>, so a later writer can tell a dead writer's leftover

def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def _remove_dead_writers_leftovers(path: Path, suffix: str) -> None:
    """Remove temp files or staging folders of `path` that a writer on this host left when it was killed."""
    host_part = f".{path.name}.{socket.gethostname()}."
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"):
        pid = leftover.name[len(host_part):].split(".", 1)[0] if leftover.name.startswith(host_part) else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


# ---- Linux's atomic exchange of two paths (Python's os module has no renameat2)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step; False where the platform or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))
