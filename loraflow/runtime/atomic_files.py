"""Atomic writes of small local files (JSON, text): a temp file in the same folder, fsync, rename.

    write_json_atomic(output_dir / "metrics.json", metrics)       # json.dumps(indent=1, default=str)
    write_text_atomic(output_dir / "eval_report.md", report)

A reader sees the old file or the new one, never half of one. The temp file's name holds the writer's pid and a
random part, so two writers of one path (processes or threads) never share a temp file. Artifacts in the store
(Parquet + manifest, local or fsspec) have their own writer in loraflow.runtime.artifact_store, with disk-full reporting.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, payload, *, indent: int = 1) -> Path:
    """`payload` as JSON (values JSON cannot hold are written as str()) to `path`; returns the path."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=str))
