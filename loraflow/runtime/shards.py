"""Running a stage task over shards on a Prefect task runner (prefect-dask's DaskTaskRunner, or in process).

`map_stage` is `run_stage` for many shards at once: every shard's task is submitted, all are awaited (so one
failing shard does not cancel the others' work, which stays cached), and a cached result whose artifact is
missing or corrupt is recomputed with `refresh_cache=True`, like `run_stage` does for a single task.
"""

import time

from prefect import get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from loraflow.config.prepare import PrepareConfig
from loraflow.runtime.stage_output import StageResult
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.stage_task import result_storage


def build_task_runner(config: PrepareConfig):
    """The task runner the shard tasks run on: a Dask cluster (a running one at `address`, else a local one of
    `workers` processes, started and closed with the subflow), or this process."""
    if config.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise RuntimeError("prepare.task_runner=dask needs prefect-dask: pip install prefect-dask==0.3.7 "
                               "(a dependency of loraflow; re-run `make setup`)") from None
        if config.address:
            return DaskTaskRunner(address=config.address)
        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(config))
    return ThreadPoolTaskRunner(max_workers=1)  # shards one after another: memory stays that of one shard


def local_cluster_kwargs(config: PrepareConfig) -> dict:
    """distributed.LocalCluster's arguments for `workers` processes."""
    # One thread per process: the stages are Python and pandas code that holds the GIL. ":0" picks a free port
    # for the dashboard, so two runs on one machine do not fight over 8787.
    return {"n_workers": config.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}


def map_stage(stage_task_fn, store: ArtifactStore, shard_parameters: list[dict], **shared) -> tuple[list[tuple[StageResult, bool]], float]:
    """Submit `stage_task_fn` once per shard (its own parameters plus `shared`) on the flow's task runner.

    Returns ([(result, was_cached) per shard, in shard order], seconds). Must run inside a flow.
    """
    started = time.perf_counter()
    configured = stage_task_fn.with_options(result_storage=result_storage(store.root))
    futures = [configured.submit(**parameters, **shared) for parameters in shard_parameters]
    wait(futures)
    outcomes = [(future.result(), future.state.name == "Cached") for future in futures]  # raises a shard's error
    stale = [index for index, (result, _) in enumerate(outcomes) if not _artifacts_valid(store, result)]
    if stale:
        get_run_logger().warning("%s: %d shard(s) have a missing or corrupt cached artifact; recomputing them",
                                 stage_task_fn.name, len(stale))
        refreshed = configured.with_options(refresh_cache=True)
        redo = [refreshed.submit(**shard_parameters[index], **shared) for index in stale]
        wait(redo)
        for index, future in zip(stale, redo):
            outcomes[index] = (future.result(), False)
    return outcomes, time.perf_counter() - started


def _artifacts_valid(store: ArtifactStore, result: StageResult) -> bool:
    refs = [result.output] + ([result.quarantine] if result.quarantine else [])
    return all(store.is_valid(ref) for ref in refs)


def run_checked(task_fn, store: ArtifactStore, refs_of, **parameters):
    """Run a task whose result holds several artifacts (`refs_of(result)` lists them); recompute it when any is
    missing or corrupt. Returns (result, was_cached, seconds)."""
    started = time.perf_counter()
    configured = task_fn.with_options(result_storage=result_storage(store.root))
    state = configured(**parameters, return_state=True)
    result, cached = state.result(), state.name == "Cached"
    if not all(store.is_valid(ref) for ref in refs_of(result)):
        get_run_logger().warning("%s: a cached artifact is missing or corrupt; recomputing", task_fn.name)
        state = configured.with_options(refresh_cache=True)(**parameters, return_state=True)
        result, cached = state.result(), False
    return result, cached, time.perf_counter() - started
