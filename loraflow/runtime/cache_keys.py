"""Prefect cache keys for stages: input artifact hashes + config + fingerprints + the stage's own code.

Never the run id, so an unchanged re-run is a cache hit in a new run. Returns None (no caching) when an
input artifact is missing (a local file or an object in an fsspec store such as S3, asked through the store's
own filesystem), so a deleted upstream file forces a recompute instead of a stale hit.
"""

import hashlib
import inspect
import json
import sys
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from loraflow.runtime.artifact_store import ArtifactRef, artifact_exists

class _MissingInput(Exception):
    pass


def stage_cache_key(context, parameters: dict) -> str | None:
    """Cache key of a stage task run (Prefect `cache_key_fn`)."""
    try:
        payload = {name: _canonical(value) for name, value in sorted(parameters.items())}
    except _MissingInput:
        return None
    task_fn = context.task.fn
    material = json.dumps(
        {"task": context.task.name, "code": code_hash(task_fn.__module__), "params": payload}, sort_keys=True
    )
    return f"{context.task.name}-{hashlib.sha256(material.encode()).hexdigest()[:32]}"


def _canonical(value):
    if isinstance(value, ArtifactRef):
        if not artifact_exists(value.uri):
            raise _MissingInput(value.uri)
        return {"artifact": value.sha256}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, Path):
        return str(value)
    return value


# Modules whose code shapes a stage's output: the stage itself and what it uses from these packages (the train,
# evaluate and publish stages keep their recipe in tasks/ and the work in the library modules named here).
CODE_PREFIXES = ("tasks.", "data_contracts", "loraflow.runtime.stage_output", "loraflow.runtime.artifact_store", "loraflow.modeling.base_model",
                 "loraflow.training", "loraflow.evaluation", "loraflow.publishing.merge", "loraflow.publishing.model_card", "loraflow.publishing.hub",
                 "loraflow.runtime.atomic_files", "loraflow.runtime.tokens_input", "loraflow.sources", "loraflow.synthesizers",
                 "loraflow.templates", "loraflow.modeling.prompt_encoding")


@lru_cache(maxsize=None)
def code_hash(module_name: str) -> str:
    """Hash of a stage module's source and of every project module it reaches (synthesizers, templates,
    sources, contracts), so editing any of them invalidates that stage's cache and only that stage's."""
    seen, pending = set(), [module_name]
    while pending:
        name = pending.pop()
        if name in seen or name not in sys.modules:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent.startswith(CODE_PREFIXES):  # a package's registry names its plug-in modules
            pending.append(parent)
        for value in vars(sys.modules[name]).values():
            used = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(used, str) and used.startswith(CODE_PREFIXES) and used not in seen:
                pending.append(used)
    seen |= {name for name in sys.modules if name.startswith("data_contracts")}  # contract objects hide their module
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode() + inspect.getsource(sys.modules[name]).encode())
    return digest.hexdigest()[:16]
