"""loraflow's cache folder on this machine: models, precision choices, Prefect results of local stores."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """loraflow's cache folder ($LORAFLOW_CACHE, else ~/.cache/loraflow)."""
    return Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))
