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
random part, so two writers of one path (processes or threads) never share one. Artifacts in an object store are
written whole by the store (loraflow.runtime.artifact_store), which uses `atomic_file` for a local store.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_file(path: str | Path, *, temp_prefix: str | None = None) -> Iterator[Path]:
    """A temp path beside `path` (parent folders made) for the body to write; on a clean exit it is fsynced and
    renamed onto `path`, on an error removed. `temp_prefix` names it (default `.<name>.<pid>.`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{temp_prefix or f'.{path.name}.{os.getpid()}.'}{uuid.uuid4().hex[:12]}.part")
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
    staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.staging")
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
