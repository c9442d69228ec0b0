"""Lineage as Prefect assets: each source by its location, each model name as `loraflow://models/<name>`.

A publish materializes the model's asset (metadata: the version, headline metrics, each source's fingerprint and
rows) with the run's sources as its upstream assets, so Prefect's events (and UI) show which data made which
version. loraflow references a source asset and never materializes it: that is the upstream's job, and a deployment
trigger on it retrains when the data lands (`loraflow schedule CONFIG --on-data`). A source that loraflow
materialized itself would trigger its own retraining again.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

MATERIALIZED_EVENT = "prefect.asset.materialization.succeeded"


def source_asset_key(address: str, local: Path | None) -> str:
    """A source's asset key: `file://` + its absolute path for a local file, else its address when that is a URL
    (credentials are already left out of it), else `loraflow-source://<address>`."""
    if local is not None:
        return "file://" + quote(str(Path(local).resolve()))
    if "://" in address:
        return quote(address, safe=":/@.-_~%=")
    return "loraflow-source://" + quote(address, safe="/.-_~")


def model_asset_key(model_name: str) -> str:
    """The asset of a model name (its versions are materializations of it)."""
    return f"loraflow://models/{model_name}"


def materialize_published_model(model_name: str, version: int, source_keys: list[str], metadata: dict) -> None:
    """Record the publish of `version` as a materialization of the model's asset, its sources as upstream assets."""
    from prefect.assets import Asset, AssetProperties, materialize

    model = Asset(key=model_asset_key(model_name),
                  properties=AssetProperties(name=model_name, description=f"loraflow model {model_name}: the published versions"))

    @materialize(model, asset_deps=sorted(set(source_keys)), name="model-asset")
    def published_model() -> int:
        model.add_metadata({"version": version, **metadata})
        return version

    published_model()
