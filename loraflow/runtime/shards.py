"""Running a stage task over shards on a Prefect task runner (prefect-dask's DaskTaskRunner, or in process).

`map_stage` is `run_stage` for many shards (or digest partitions) at once (`run_verified` with `mapped=True`): every
call's task is submitted, all are awaited, and a cached result whose artifact is missing or corrupt is recomputed.
"""

import time

from prefect.task_runners import ThreadPoolTaskRunner

from loraflow.config.prepare import PrepareConfig
from loraflow.runtime.stage_output import StageResult
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.stage_task import artifacts_valid, result_storage, run_verified, stage_refs


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


def map_stage(stage_task_fn, store: ArtifactStore, shard_parameters: list[dict], *, refs_of=stage_refs,
              **shared) -> tuple[list[tuple[StageResult, bool]], float]:
    """Submit `stage_task_fn` once per shard or partition (its own parameters plus `shared`) on the flow's task runner;
    `refs_of(result)`: the artifacts a result points at (a StageResult's output and quarantine by default).

    Returns ([(result, was_cached) per call, in call order], seconds). Must run inside a flow.
    """
    started = time.perf_counter()
    configured = stage_task_fn.with_options(result_storage=result_storage(store.root))
    calls = [{**parameters, **shared} for parameters in shard_parameters]
    outcomes = run_verified(configured, artifacts_valid(store, refs_of), calls, mapped=True)
    return outcomes, time.perf_counter() - started
