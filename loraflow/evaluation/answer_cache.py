"""One model's generations for one question set, kept on this host so an evaluation that asks the same model the
same prompts again generates nothing.

    asked = asked_digest(prompts=..., budgets=..., general_prompts=..., loss_rows=..., settings=...)
    key = answers_key(model_identity(base_fingerprint, adapter_dir), asked)
    run = load_answers(folder, key)          # {"loss", "answers", "general", "timing"} or None
    save_answers(folder, key, run)

The evaluation stage is keyed on the candidate, the data, the eval settings and the champion it is compared with, so a
new champion re-runs the stage although the base and the candidate were already asked exactly these questions (a gate
threshold changed after the candidate was published, a retry after a failed champion load). The key here is what
shapes the generations themselves: which weights (`model_identity`: the base model's fingerprint, plus the adapter
file's bytes; `published_identity`: a published model's manifest of file hashes), the rendered prompts and their token budgets, the
general prompts, the loss rows, the generation settings, and the code of loraflow.evaluation.generation and what it
imports. Scores are recomputed from the answers each time, so a change to the metrics needs no regeneration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from loraflow.runtime.atomic_files import write_json_atomic
from loraflow.runtime.code_graph import code_hash

PUBLISHED_MANIFEST = "loraflow-manifest.json"  # = loraflow.publishing.merge.MODEL_MANIFEST (merge imports torch)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_config.json")


def model_identity(base_fingerprint: str, adapter_dir: str | Path | None = None) -> str | None:
    """What the answers of the base model (its fingerprint: loraflow.training.checkpoints.base_model_fingerprint),
    or of base + the adapter in `adapter_dir` merged in memory (its weight and config bytes), depend on, as a short
    hash; None where the adapter's files cannot be read (nothing is then reused or kept)."""
    digest = hashlib.sha256(b"base\0" + base_fingerprint.encode())
    if adapter_dir is not None:
        for name in ADAPTER_WEIGHTS:
            path = Path(adapter_dir) / name
            if not path.exists():
                return None
            digest.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def published_identity(model_dir: str | Path) -> str | None:
    """The same for a published model folder: its manifest of file hashes; None without one."""
    manifest = Path(model_dir) / PUBLISHED_MANIFEST
    if not manifest.exists():
        return None
    return hashlib.sha256(b"published\0" + manifest.read_bytes()).hexdigest()[:16]


def asked_digest(*, prompts: list, budgets: list[int], general_prompts: list, loss_rows, settings: dict) -> str:
    """What every model of one evaluation is asked, as one hash: the prompts and budgets, the general prompts, the
    loss rows, the generation settings and the generation code (computed once per evaluation, not per model)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"prompts": prompts, "budgets": budgets, "general": general_prompts, "settings": settings,
                              "code": code_hash("loraflow.evaluation.generation")},
                             sort_keys=True, default=_plain).encode())
    for column in ("input_ids", "labels"):
        for row in _column(loss_rows, column):
            digest.update(np.asarray(row, dtype=np.int64).tobytes() + b"\xff")
    return digest.hexdigest()


def answers_key(identity: str, asked: str) -> str:
    """The cache key of one model's generations: its weights' identity and `asked_digest`."""
    return hashlib.sha256(f"{identity}\0{asked}".encode()).hexdigest()[:24]


def load_answers(folder: str | Path, key: str) -> dict | None:
    """The kept generations of `key`, or None (never kept, or unreadable: then they are generated again)."""
    path = Path(folder) / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_answers(folder: str | Path, key: str, run: dict) -> None:
    """Keep one model's generations: loss, answers, general answers and timing (atomically)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(folder) / f"{key}.json",
                      {name: run[name] for name in ("loss", "answers", "general", "timing")})


def _column(rows, name: str) -> list:
    if rows is None or len(rows) == 0:
        return []
    if hasattr(rows, "column_names"):  # an Arrow table
        return rows.column(name).to_pylist() if name in rows.column_names else []
    return list(rows[name]) if name in rows else []


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
