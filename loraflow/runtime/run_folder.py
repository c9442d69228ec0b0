"""The run folder as the place a user looks: `<runs_dir>/<name>/<run>/model` points at the published model.

The model itself lives in the content-addressed store (`<store>/publish/<hash>/model/`, shared by every run that
published the same adapter); the run folder gets a `model` symlink to it, or, where symlinks cannot be made
(Windows without developer mode, some network file systems), `model.txt` holding its path.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_LINK = "model"
MODEL_POINTER = "model.txt"


def link_model(run_dir: str | Path, model_dir: str | Path) -> Path:
    """Point `run_dir/model` at `model_dir` (a symlink, else `model.txt` with the path); returns what was written."""
    run_dir, model_dir = Path(run_dir), Path(model_dir).resolve()
    link = run_dir / MODEL_LINK
    if link.is_symlink():
        link.unlink()
    try:
        os.symlink(model_dir, link, target_is_directory=True)
        return link
    except OSError:
        pointer = run_dir / MODEL_POINTER
        pointer.write_text(f"{model_dir}\n")
        return pointer


def published_model_dir(path: str | Path) -> Path | None:
    """The published model folder for a run folder (its `model` link or `model.txt`), or `path` itself when it is a
    model folder; None when neither is there (the CLI then asks the run's summary.json: loraflow.runs.summary)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / MODEL_LINK / "config.json").exists():
        return (path / MODEL_LINK).resolve()
    if (path / MODEL_POINTER).exists():
        return Path((path / MODEL_POINTER).read_text().strip())
    return None

