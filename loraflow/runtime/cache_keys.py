"""The Prefect cache policy of every stage: input artifact hashes + parameters + the code that shapes the output.

    @stage_task(name="format")                                # the decorator carries STAGE_CACHE
    run_locked(train_task, ..., cache_policy=STAGE_CACHE - "run_name" - "tracking_params")

The key is the task's name, its parameters (an ArtifactRef by its sha256, a pydantic config by `model_dump`, a
parameter subtracted with `-` left out) and the stage's code hash: the names and sources of every project module
the stage module reaches in its static import graph (loraflow.runtime.code_graph). Never the run id, so an
unchanged re-run is a cache hit in a new run. The key is None (no caching) when an input artifact is missing (a
local file or an object in an fsspec store such as S3, asked through the store's own filesystem), so a deleted
upstream file forces a recompute instead of a stale hit.
"""

import hashlib
import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from loraflow.runtime.artifact_store import ArtifactRef, artifact_exists
from loraflow.runtime.code_graph import code_hash, module_file


class _MissingInput(Exception):
    pass


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key of a stage task run; `policy - "name"` leaves a parameter out of the key (Prefect's idiom)."""

    exclude: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        """`<task name>-<hash>`, or None when an input artifact is missing."""
        try:
            payload = {name: _canonical(value) for name, value in sorted(inputs.items()) if name not in self.exclude}
        except _MissingInput:
            return None
        task = task_ctx.task
        material = json.dumps({"task": task.name, "code": stage_code_hash(task.fn), "params": payload}, sort_keys=True)
        return f"{task.name}-{hashlib.sha256(material.encode()).hexdigest()[:32]}"

    def __sub__(self, name: str) -> "StageCachePolicy":
        return replace(self, exclude=(*self.exclude, name))

    def __add__(self, other):
        # Prefect's CompoundCachePolicy drops a part's None, which would turn a missing input into a stale hit.
        raise TypeError("StageCachePolicy is the whole key: combining it would ignore its 'missing input' None")


STAGE_CACHE = StageCachePolicy()
# Stages that read the tokenizer: keyed by its fingerprint (its files' hash), not by the folder this host keeps it in,
# so hosts that share a store share these stages' results whatever their loraflow cache folder.
TOKENIZER_STAGE_CACHE = STAGE_CACHE - "tokenizer_dir"


def stage_code_hash(fn) -> str:
    """The code hash of the module that defines a stage's function. A project module is read from the project's
    files by name (on a Dask worker the function arrives rebuilt from its code, with no file of its own); a module
    elsewhere (a task defined in a test) from the function's source file."""
    if module_file(fn.__module__) is not None:
        return code_hash(fn.__module__)
    return code_hash(fn.__module__, start_file=Path(inspect.getsourcefile(fn)).resolve())


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
