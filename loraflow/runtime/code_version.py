"""Which code made a model: the package version, the git commit (and whether the tree had local changes) when the
checkout is a git repository, and always a hash of the project's Python sources (what a commit cannot tell apart
in a dirty tree or an unpacked copy)."""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("loraflow", "tasks", "flows", "data_contracts")


@lru_cache(maxsize=1)
def code_version() -> dict:
    """{"package": "0.1.0", "git_commit": "ab12…" or None, "git_dirty": bool or None, "code_hash": "…"}."""
    from loraflow import __version__

    return {"package": __version__, **git_state(PROJECT), "code_hash": source_hash(PROJECT)}


def git_state(folder: Path) -> dict:
    """The checkout's commit and whether tracked files differ from it; Nones outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if commit.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


def source_hash(folder: Path) -> str:
    """sha256 (16 hex digits) over the path and bytes of every .py file of the project's packages."""
    digest = hashlib.sha256()
    for path in sorted(p for name in SOURCE_FOLDERS for p in (folder / name).rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
