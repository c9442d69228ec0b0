"""Config of the stage locks: which backend keeps two runs of the same stage from computing it twice."""

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from loraflow.config.base import StrictModel

LockBackend = Literal["local", "object-store", "redis"]


class LockConfig(StrictModel):
    """Where stage locks live. `local` (the default) locks train/DPO/evaluate/publish on this host; `object-store` and
    `redis` lock every stage across the hosts that share the store."""

    backend: LockBackend = Field(
        "local",
        description="local: the data stages run unlocked (a twin writes the same bytes). object-store: each data stage "
        "(ingest .. tokenize) takes a lease object next to the artifacts (<store>/locks/<key>.lock, S3 conditional "
        "puts), so workers on different hosts that share an s3:// store compute it once; so do train, DPO, evaluate and "
        "publish, whose folders travel through the store (<store>/folders/). redis: the same through prefect-redis's "
        "lock manager on locks.redis_url. local: train, DPO, evaluate and publish take lock files in this host's "
        "folder for the store.",
    )
    lease_seconds: float = Field(
        60.0, ge=3, le=3600,
        description="object-store and redis: how long a lock outlives a holder that stopped renewing it (a killed "
        "host); the holder renews it every third of this while its stage runs.",
    )
    wait_seconds: float | None = Field(
        None, gt=0,
        description="How long a run waits for a live holder of the same stage before failing; None: "
        "LORAFLOW_LOCK_WAIT_S, else 6 hours (a training run).",
    )
    redis_url: str | None = Field(
        None, description="redis: the server, e.g. redis://redis.internal:6379/0 or rediss:// for TLS (a password "
        "belongs in the worker's REDIS_PASSWORD, never in this URL, which is refused with one).",
    )

    @model_validator(mode="after")
    def _redis_needs_a_url(self):
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url: backend redis needs the server's URL -> set locks.redis_url, e.g. "
                             "redis://host:6379/0")
        if self.redis_url and urlsplit(self.redis_url).password:
            raise ValueError("redis_url: a password in the URL is refused (the config is a flow parameter, shown in "
                             "the UI) -> set REDIS_PASSWORD in the worker's environment")
        return self
