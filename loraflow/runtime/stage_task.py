"""The thin Prefect layer every stage shares: a task decorator with content-based caching (STAGE_CACHE), and
`run_verified`, which runs stage tasks, verifies what their results point at and recomputes a stale cached one;
`run_stage` and `run_locked` are its two uses; `shared_lock_manager` (data stages) and `folder_lock_manager`
(train, DPO, evaluate, publish) turn the config's `locks` into the lock managers they take."""

import hashlib
import time
from functools import lru_cache, partial
from pathlib import Path

from prefect import get_run_logger, task
from prefect.filesystems import RemoteFileSystem
from prefect.futures import wait
from prefect.settings import PREFECT_API_URL

from loraflow.config.locks import LockConfig
from loraflow.runtime.cache_keys import STAGE_CACHE
from loraflow.runtime.stage_locks import LeaseLockManager
from loraflow.runtime.cache_folder import cache_dir
from loraflow.runtime.stage_output import StageResult
from loraflow.runtime.store_folders import from_store
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore, is_url

# JSON results keep cached StageResults readable and portable (not cloudpickle blobs tied to one machine).
stage_task = partial(task, cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")


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


def shared_lock_manager(locks: LockConfig, store_root: str):
    """The lock manager of the stages whose outputs live in the store (the data stages), as `locks.backend` says:
    None for `local` (they run unlocked: a twin writes the same content-addressed bytes), lease objects in the s3://
    store for `object-store`, prefect-redis with a lease for `redis`; the last two hold across hosts."""
    if locks.backend == "object-store":
        from loraflow.runtime.object_store_locks import ObjectStoreLockManager

        return ObjectStoreLockManager(store_root, lease_seconds=locks.lease_seconds, wait_seconds=locks.wait_seconds)
    if locks.backend == "redis":
        from loraflow.runtime.redis_locks import redis_lock_manager

        return redis_lock_manager(locks.redis_url, lease_seconds=locks.lease_seconds, wait_seconds=locks.wait_seconds)
    return None


def host_lock_manager(locks: LockConfig, store_root: str) -> LeaseLockManager:
    """Lock files in this host's folder for the store: they serialise twin runs on this host only."""
    return LeaseLockManager(local_root(store_root) / "locks", wait_seconds=locks.wait_seconds)


def folder_lock_manager(locks: LockConfig, store_root: str):
    """The lock manager of train, DPO, evaluate and publish, whose outputs are folders: the shared one when
    `locks.backend` holds across hosts (object-store, redis: the folders travel through the store,
    loraflow.runtime.store_folders), else this host's lock files."""
    return shared_lock_manager(locks, store_root) if locks.backend != "local" else host_lock_manager(locks, store_root)


def locked_policy(cache_policy, lock_manager):
    """`cache_policy` under SERIALIZABLE isolation with `lock_manager`: one run per cache key computes, the others
    wait for it and take its result as a cache hit."""
    return cache_policy.configure(isolation_level="SERIALIZABLE", lock_manager=lock_manager)


def run_verified(configured_task, is_valid, calls: list[dict], *, mapped: bool = False,
                 localize=None) -> list[tuple[object, bool]]:
    """Run `configured_task` once per parameter set in `calls` (or take its cached result); returns
    [(result, was_cached)] in call order.

    A result that `is_valid` rejects (a cached result whose artifact or folder is missing or corrupt) is never
    used: that call is re-run with `refresh_cache=True`, which recomputes it and overwrites the cache entry.
    `mapped` submits every call to the flow's task runner and awaits them all (one failing call does not cancel
    the others' work, which stays cached); otherwise they run one after another in this thread. `localize` makes a
    result usable on this host before it is checked (a folder another host made, fetched from the store).
    """
    outcomes = _run_all(configured_task, calls, mapped)
    if localize is not None:
        outcomes = [(localize(result), cached) for result, cached in outcomes]
    stale = [index for index, (result, _) in enumerate(outcomes) if not is_valid(result)]
    if stale:
        get_run_logger().warning("%s: %d cached result(s) point at a missing or corrupt output; recomputing",
                                 configured_task.name, len(stale))
        redone = _run_all(configured_task.with_options(refresh_cache=True), [calls[index] for index in stale], mapped)
        for index, (result, _) in zip(stale, redone):
            outcomes[index] = (result, False)
    return outcomes


def _run_all(configured_task, calls: list[dict], mapped: bool) -> list[tuple[object, bool]]:
    if mapped:
        futures = [configured_task.submit(**parameters) for parameters in calls]
        wait(futures)
        return [(future.result(), future.state.name == "Cached") for future in futures]  # raises a call's error
    states = [configured_task(**parameters, return_state=True) for parameters in calls]
    return [(state.result(), state.name == "Cached") for state in states]


def stage_refs(result: StageResult) -> list[ArtifactRef]:
    """The artifacts a stage result points at: its output and, when it has one, its quarantine."""
    return [result.output] + ([result.quarantine] if result.quarantine else [])


def artifacts_valid(store: ArtifactStore, refs_of=stage_refs):
    """The check `run_verified` needs for results that point at artifacts: every one of them is valid in `store`."""
    return lambda result: all(store.is_valid(ref) for ref in refs_of(result))


def run_stage(stage_task_fn, store: ArtifactStore, *, refs_of=stage_refs, lock_manager=None,
              **parameters) -> tuple[object, bool, float]:
    """Run a stage task (or take its cached result) and return (result, was_cached, seconds); a cached result
    any of whose artifacts (`refs_of(result)`) is missing or corrupt is recomputed. With a `lock_manager`
    (shared_lock_manager) a twin run waits for the one computing and reuses its result."""
    started = time.perf_counter()
    configured = stage_task_fn.with_options(result_storage=result_storage(store.root))
    if lock_manager is not None:
        configured = configured.with_options(cache_policy=locked_policy(stage_task_fn.cache_policy, lock_manager))
    [(result, cached)] = run_verified(configured, artifacts_valid(store, refs_of), [parameters])
    return result, cached, time.perf_counter() - started


def run_locked(task_fn, lock_root: str, is_valid, *, cache_policy=STAGE_CACHE, lock_manager=None,
               folder: Path | None = None, **parameters) -> tuple[object, bool]:
    """Run a task once per cache key across concurrent runs (SERIALIZABLE isolation; `lock_manager` from
    folder_lock_manager, by default lock files of this host's folder for the store).

    A second run with the same inputs waits for the first and then takes its result as a cache hit, so two
    identical runs never train or publish twice. A lock whose holder died (kill -9) is taken over, and a live
    holder is waited for with a log line and a bound (`loraflow.runtime.stage_locks`). A cached result that `is_valid`
    rejects (its folder was deleted) is recomputed. `folder`: this host's copy of the stage's output folder; with a
    URL store a result made on another host is moved to it and the folder fetched from the store first
    (loraflow.runtime.store_folders). Returns (result, was_cached).
    """
    policy = locked_policy(cache_policy, lock_manager or LeaseLockManager(local_root(lock_root) / "locks"))
    configured = task_fn.with_options(cache_policy=policy, persist_result=True, result_serializer="json",
                                      result_storage=result_storage(lock_root))
    localize = partial(from_store, store_root=lock_root, folder=folder, is_valid=is_valid) if folder else None
    [(result, cached)] = run_verified(configured, is_valid, [parameters], localize=localize)
    return result, cached
