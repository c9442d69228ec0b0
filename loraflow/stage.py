"""What every stage returns, and the one way a stage writes its output and its quarantine."""

import pandas as pd
from pydantic import BaseModel, Field

from data_contracts import QUARANTINE, Contract, enforce
from loraflow.store import ArtifactRef, ArtifactStore


class StageResult(BaseModel):
    """A stage's output reference plus the row accounting the run summary shows."""

    stage: str
    output: ArtifactRef
    quarantine: ArtifactRef | None = None
    rows_in: int
    rows_out: int
    rows_quarantined: int
    stats: dict = Field(default_factory=dict, description="Stage-specific counts (skips, truncations, ...).")


def write_stage_output(
    store: ArtifactStore,
    *,
    stage: str,
    contract: Contract,
    frame: pd.DataFrame,
    rows_in: int,
    config_hash: str,
    quarantined: pd.DataFrame | None = None,
    stats: dict | None = None,
) -> StageResult:
    """Enforce `contract` on `frame`, write valid rows and all quarantined rows, and account for every row.

    `quarantined` holds rows the stage itself set aside (same columns as the quarantine contract); rows that
    break the contract's row rules are added to them.
    """
    valid, broken = enforce(frame, contract, where=f"stage '{stage}'")
    all_quarantined = pd.concat([q for q in (quarantined, broken) if q is not None and len(q)], ignore_index=True) \
        if (quarantined is not None and len(quarantined)) or len(broken) else broken
    output = store.write(valid, stage=stage, contract=contract.name, schema_version=contract.version, config_hash=config_hash)
    quarantine_ref = None
    if len(all_quarantined):
        quarantine_ref = store.write(
            all_quarantined, stage=f"{stage}-quarantine", contract=QUARANTINE.name,
            schema_version=QUARANTINE.version, config_hash=config_hash,
        )
    rows_dropped_silently = rows_in + (stats or {}).get("rows_expanded", 0) - len(valid) - len(all_quarantined)
    return StageResult(
        stage=stage, output=output, quarantine=quarantine_ref, rows_in=rows_in, rows_out=len(valid),
        rows_quarantined=len(all_quarantined), stats={**(stats or {}), "unaccounted_rows": rows_dropped_silently},
    )


def read_input(store: ArtifactStore, ref: ArtifactRef, contract: Contract) -> pd.DataFrame:
    """Read an upstream artifact, verifying its hash and its contract's structure."""
    from data_contracts import check_structure

    frame = store.read(ref)
    check_structure(frame, contract, where=ref.uri)
    return frame
