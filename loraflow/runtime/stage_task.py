"""The thin Prefect layer every stage shares: a task decorator with content-based caching, and
`run_stage`, which calls a stage task, verifies its output artifact and recomputes it if corrupt."""

import hashlib
import time
from functools import lru_cache, partial
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.filesystems import RemoteFileSystem
from prefect.settings import PREFECT_API_URL

from loraflow.runtime.cache_keys import stage_cache_key
from loraflow.runtime.stage_locks import LeaseLockManager
from loraflow.runtime.cache_folder import cache_dir
from loraflow.runtime.stage_output import StageResult
from loraflow.runtime.artifact_store import ArtifactStore, is_url

# JSON results keep cached StageResults readable and portable (not cloudpickle blobs tied to one machine).
stage_task = partial(task, cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json")


def result_storage(store_root: str) -> Path | RemoteFileSystem:
    """Where Prefect keeps cached stage results: next to the artifacts they point to.

    For a URL store (`s3://bucket/prefix`) that is Prefect's fsspec-backed `RemoteFileSystem` block on
    `<store>/prefect-results`, so every worker that shares the bucket shares the cache. Its `settings` stay
    empty on purpose: fsspec takes credentials and endpoint from the environment, never from this block.
    """
    if is_url(store_root):
        return _saved_remote_storage(f"{store_root.rstrip('/')}/prefect-results", PREFECT_API_URL.value())
    return Path(store_root.removeprefix("file://")).resolve() / "prefect-results"


@lru_cache(maxsize=None)
def _saved_remote_storage(basepath: str, api_url: str | None) -> RemoteFileSystem:
    """The `RemoteFileSystem` block for `basepath`, saved on the API once per process and API (Prefect 3.8
    refuses an unsaved block as task result storage; a saved one also lets any worker read the results back).
    The block holds only the URL, so it is safe to show in the UI's Blocks page."""
    name = "loraflow-results-" + hashlib.sha256(basepath.encode()).hexdigest()[:16]
    block = RemoteFileSystem(basepath=basepath)
    block.save(name, overwrite=True)
    return block


def local_root(store_root: str) -> Path:
    """The local folder for what cannot live in an object store (lock files, folders that transformers writes
    and reads by path): the store itself when it is local, else a folder of this host's loraflow cache named
    after the URL. Lock files there serialise twin runs on this host only."""
    if is_url(store_root):
        return cache_dir() / "stores" / hashlib.sha256(store_root.rstrip("/").encode()).hexdigest()[:16]
    return Path(store_root.removeprefix("file://")).resolve()


def run_stage(stage_task_fn, store: ArtifactStore, **parameters) -> tuple[StageResult, bool, float]:
    """Run a stage task (or take its cached result) and return (result, was_cached, seconds).

    A cached result whose artifact is missing or corrupt is never used: the task is re-run with
    `refresh_cache=True`, which recomputes and overwrites the cache entry.
    """
    started = time.perf_counter()
    configured = stage_task_fn.with_options(result_storage=result_storage(store.root))
    state = configured(**parameters, return_state=True)
    result: StageResult = state.result()
    cached = state.name == "Cached"
    refs = [result.output] + ([result.quarantine] if result.quarantine else [])
    if not all(store.is_valid(ref) for ref in refs):
        get_run_logger().warning(
            "%s: cached artifact %s is missing or corrupt; recomputing it", result.stage, result.output.uri
        )
        state = configured.with_options(refresh_cache=True)(**parameters, return_state=True)
        result, cached = state.result(), False
    return result, cached, time.perf_counter() - started


def run_locked(task_fn, lock_root: str, is_valid, *, cache_key_fn=stage_cache_key, **parameters) -> tuple[object, bool]:
    """Run a task once per cache key across concurrent runs (SERIALIZABLE isolation, file locks in the store).

    A second run with the same inputs waits for the first and then takes its result as a cache hit, so two
    identical runs never train or publish twice. A lock whose holder died (kill -9) is taken over, and a live
    holder is waited for with a log line and a bound (`loraflow.runtime.stage_locks`). A cached result that `is_valid`
    rejects (its folder was deleted) is recomputed. Returns (result, was_cached).
    """
    policy = CacheKeyFnPolicy(cache_key_fn=cache_key_fn).configure(
        isolation_level="SERIALIZABLE",
        lock_manager=LeaseLockManager(local_root(lock_root) / "locks"),
    )
    configured = task_fn.with_options(cache_policy=policy, persist_result=True, result_serializer="json",
                                      result_storage=result_storage(lock_root))
    state = configured(**parameters, return_state=True)
    result, cached = state.result(), state.name == "Cached"
    if not is_valid(result):
        get_run_logger().warning("%s: cached result points at missing output; recomputing", task_fn.name)
        state = configured.with_options(refresh_cache=True)(**parameters, return_state=True)
        result, cached = state.result(), False
    return result, cached
