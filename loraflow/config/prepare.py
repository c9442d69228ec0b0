"""Config of how the data stages run: in one process (the default), or sharded over worker processes."""

from typing import Literal

from pydantic import Field, model_validator

from loraflow.config.base import StrictModel


class PrepareConfig(StrictModel):
    """Sharding of synthesize -> format -> tokenize after ingest, and the Prefect task runner the shards run on.

    shards = 1 is the single-process path: the same tasks, artifacts and cache keys as before this option existed.
    With shards > 1, every source row goes to shard blake2b(row id) mod shards, so one row's questions stay
    together and a row keeps its shard as data grows; dataset-level steps (duplicates, leakage, pre-flight) still
    run once over all shards, and the final artifacts equal the single-process ones.
    """

    shards: int = Field(
        1, ge=1, le=4096,
        description=(
            "Number of hash shards after ingest; 1 = single process (default). Size shards by memory (a worker held "
            "2.4 GiB for a 19,000-row shard of the benchmark catalog) and keep the number: changing it moves rows "
            "between shards, so every shard recomputes once."
        ),
    )
    task_runner: Literal["none", "dask"] = Field(
        "none",
        description=(
            "Where shard tasks run: none = one after another in the flow's process; dask = a local Dask cluster of "
            "`workers` processes (prefect-dask's DaskTaskRunner, one thread each)."
        ),
    )
    workers: int = Field(2, ge=1, le=256, description="dask only: worker processes of the local cluster (each holds one shard at a time in memory).")
    address: str | None = Field(
        None,
        description=(
            "dask only: address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786) to send the shards to instead of "
            "starting a local cluster; its workers need this loraflow installed and the store at the same path or URL."
        ),
    )

    @model_validator(mode="after")
    def _dask_needs_shards(self):
        if self.task_runner == "dask" and self.shards < 2:
            raise ValueError("prepare.task_runner=dask needs prepare.shards >= 2 (one shard has nothing to spread); "
                             "set shards to a multiple of workers, e.g. shards: 8")
        if self.address and self.task_runner != "dask":
            raise ValueError("prepare.address is the Dask scheduler's address: set prepare.task_runner: dask too, or remove it")
        return self
