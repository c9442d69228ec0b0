"""What every stage returns, and the one way a stage writes its output and its quarantine."""

import re

import pandas as pd
from pydantic import BaseModel, Field

from data_contracts import QUARANTINE, Contract, ContractViolation, enforce
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore


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
    if len(frame) == 0 and quarantined is not None and len(quarantined) and not contract.allow_empty:
        raise_emptied(store, stage, quarantined, rows_in, config_hash)
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


def raise_emptied(store: ArtifactStore, stage: str, quarantined: pd.DataFrame, rows_in: int, config_hash: str) -> None:
    """The stage set every row aside: keep them in its quarantine artifact and stop here, saying why."""
    ref = store.write(quarantined, stage=f"{stage}-quarantine", contract=QUARANTINE.name,
                      schema_version=QUARANTINE.version, config_hash=config_hash)
    top = "; ".join(f"{count} x {reason}" for reason, count in quarantined["reason"].value_counts().head(3).items())
    raise ContractViolation(
        f"stage '{stage}': no rows left: all {rows_in} input rows were set aside ({top}); they are in {ref.uri} "
        f"-> change the data, or the {stage} settings that set them aside"
    )


def read_input(store: ArtifactStore, ref: ArtifactRef, contract: Contract) -> pd.DataFrame:
    """Read an upstream artifact, verifying its hash and its contract's structure."""
    from data_contracts import check_structure

    frame = store.read(ref)
    check_structure(frame, contract, where=ref.uri)
    return frame


# Numbers and quoted values vary row by row ("invalid JSON at line 7", "Producers is 'UNKNOWN'"): reasons that
# differ only there are one kind of reason.
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")


def top_reasons(reasons: pd.Series, count: int = 3) -> list[dict]:
    """The `count` most frequent kinds of quarantine reason: [{example, rows, similar}], most rows first.

    `example` is the first reason of its kind as written; `similar` says whether others of the kind differ from it.
    """
    if len(reasons) == 0:
        return []
    kinds = reasons.astype(str).str.replace(_VARYING, "#", regex=True)
    top = []
    for kind, rows in kinds.value_counts(sort=True).head(count).items():
        members = reasons[kinds == kind].astype(str)
        top.append({"example": members.iloc[0], "rows": int(rows), "similar": bool(members.nunique() > 1)})
    return top


def quarantine_reasons(store: ArtifactStore, result: StageResult, count: int = 3) -> list[dict]:
    """top_reasons of a stage's quarantine artifact (none when it set nothing aside)."""
    return top_reasons(store.read(result.quarantine)["reason"], count) if result.quarantine is not None else []
