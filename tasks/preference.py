"""pairs: the rows SFT trained on -> preference pairs (PAIRS) with provenance, for the DPO step (tasks/dpo.py).

Reads the FORMATTED artifact (prompts as inference sees them, answers, facts) and, from the TOKENS artifact, which
source ids are in the train split, so a row kept out of training never becomes a pair. The pairs are built by
loraflow.preference.pairs (pure functions); a pair that could not be made, or that breaks a rule of the PAIRS contract
(chosen == rejected, the rejected answer accidentally true, empty text), goes to the stage's quarantine with its
reason. rows_in counts the pairs attempted, so rows_in = rows_out + rows_quarantined.
"""

import pandas as pd

from data_contracts import FORMATTED, PAIRS
from data_contracts.base import quarantine_rows
from loraflow.config.preference import PreferenceConfig
from loraflow.preference.pairs import build_pairs, trained_rows
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.stage_output import StageResult, read_input, write_stage_output
from loraflow.runtime.stage_task import stage_task

# What the pairs depend on: the kinds and how they are made, not how DPO then trains on them.
PAIR_SETTINGS = {"kinds", "pairs_per_row", "seed"}


def train_source_ids(store: ArtifactStore, tokens_ref: ArtifactRef) -> set[str]:
    """The source ids of the TOKENS artifact's train split (what SFT trained on)."""
    ids: set[str] = set()
    for batch in store.read_batches(tokens_ref, columns=["source_id", "split"]):
        frame = batch.to_pandas()
        ids |= set(frame.loc[frame["split"] == "train", "source_id"])
    return ids


def unmade_quarantine(unmade: list[dict], first_row: int) -> pd.DataFrame:
    """Pairs the builder could not make, as quarantine rows (after the made pairs' positions) with kind and reason."""
    rows = pd.DataFrame([{k: v for k, v in pair.items() if k != "reason"} for pair in unmade],
                        index=range(first_row, first_row + len(unmade)))
    quarantine = quarantine_rows(rows, pd.Series([pair["reason"] for pair in unmade], index=rows.index, dtype=object), "pairs")
    quarantine["kind"] = [pair["kind"] for pair in unmade]
    return quarantine


def run_pairs(formatted_ref: ArtifactRef, tokens_ref: ArtifactRef, config: PreferenceConfig,
              store: ArtifactStore) -> StageResult:
    """Build the configured kinds of pairs from the trained rows; write PAIRS and its quarantine."""
    from loraflow.config.pipeline import config_hash

    rows = trained_rows(read_input(store, formatted_ref, FORMATTED), train_source_ids(store, tokens_ref))
    pairs, unmade = build_pairs(rows, config.kinds, config.pairs_per_row, config.seed)
    stats = {"trained_rows": len(rows), "attempted": {kind: int((pairs["kind"] == kind).sum())
                                                      + sum(u["kind"] == kind for u in unmade) for kind in config.kinds}}
    return write_stage_output(
        store, stage="pairs", contract=PAIRS, frame=pairs, rows_in=len(pairs) + len(unmade),
        config_hash=config_hash(config, exclude=set(PreferenceConfig.model_fields) - PAIR_SETTINGS),
        quarantined=unmade_quarantine(unmade, len(pairs)) if unmade else None, stats=stats,
    )


@stage_task(name="pairs")
def pairs_task(formatted_ref: ArtifactRef, tokens_ref: ArtifactRef, config: PreferenceConfig,
               store_root: str) -> StageResult:
    """Prefect task around `run_pairs`; cached on the input artifacts' hashes, the pair settings and this code."""
    return run_pairs(formatted_ref, tokens_ref, config, ArtifactStore(store_root))
