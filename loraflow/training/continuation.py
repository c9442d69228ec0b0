"""Continuing from the champion (train.init_from: champion): which rows to train, decided once.

    start = StartAdapter(...)                                     # the champion's adapter and data (the flow finds it)
    keep, plan = continuation_rows(records, champion_records, start, replay_share=0.25, seed=0)  # a row mask

A *source record* (one catalog row: all examples sharing a `source_id`) is unchanged when its train examples are
exactly those the champion was trained on (same prompts and answers, so same source values, template, system
prompt); edited when the champion had the record with other examples; new when it did not have it. Training
continues from the champion's LoRA weights on the examples of edited and new records plus `replay_share` of the
unchanged records' examples (drawn with the seed), so the adapter learns what changed without forgetting the rest.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from loraflow.runtime.artifact_store import ArtifactRef

RECORD_COLUMNS = ["source_id", "prompt", "reference"]  # what says whether a train row's record changed


class ContinuationError(ValueError):
    """Continuing from the champion cannot work (nothing to train, settings that differ); the message says the fix."""


class StartAdapter(BaseModel):
    """The adapter training continues from: the champion version, where its adapter is, its content hash (part of
    the train stage's cache key) and the TOKENS artifact it was trained on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str
    version: int = Field(..., description="The champion's version number.")
    adapter_dir: str = Field(..., description="The champion's adapter folder (adapter/ in its published model folder).")
    adapter_sha256: str = Field(..., description="sha256 of its adapter_model.safetensors and adapter_config.json.")
    tokens: ArtifactRef = Field(..., description="The TOKENS artifact the champion's run read (its training data).")


class ContinuationPlan(BaseModel):
    """What a continued run trains on, and from what (logged, in TrainResult and the run summary)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: StartAdapter
    records_new: int = Field(..., description="Source records the champion was not trained on.")
    records_edited: int = Field(..., description="Source records whose examples differ from the champion's.")
    records_unchanged: int = Field(..., description="Source records with exactly the champion's examples.")
    rows_changed: int = Field(..., description="Train rows (examples) of new and edited records: all trained.")
    rows_unchanged: int = Field(..., description="Train rows of unchanged records.")
    rows_replayed: int = Field(..., description="Of those, trained again (train.replay_unchanged of them).")
    replay_share: float

    def describe(self) -> str:
        """One log line."""
        return (f"continuing from {self.start.model_name} version {self.start.version} (adapter "
                f"{self.start.adapter_sha256[:12]}): {self.records_new} new + {self.records_edited} edited records "
                f"({self.rows_changed} rows) and {self.rows_replayed} of {self.rows_unchanged} unchanged rows replayed "
                f"({self.replay_share:g}); {self.records_unchanged} records unchanged")


def record_fingerprints(train_rows: pd.DataFrame) -> pd.Series:
    """source_id -> sha256 of its examples (prompt and answer, sorted): what a record taught."""
    def fingerprint(examples: pd.DataFrame) -> str:
        texts = sorted(prompt + "\x1e" + reference for prompt, reference in zip(examples["prompt"], examples["reference"]))
        return hashlib.sha256("\x1f".join(texts).encode()).hexdigest()

    return train_rows.groupby("source_id", sort=True)[["prompt", "reference"]].apply(fingerprint)


def continuation_rows(train_rows: pd.DataFrame, champion_train_rows: pd.DataFrame, start: StartAdapter, *,
                      replay_share: float, seed: int) -> tuple[np.ndarray, ContinuationPlan]:
    """Which train rows (RECORD_COLUMNS) a run continued from `start` trains on, as a boolean mask in their order
    (the changed records' rows and the replayed share of the unchanged ones), and the plan saying so.
    ContinuationError when that is none."""
    now, before = record_fingerprints(train_rows), record_fingerprints(champion_train_rows)
    unchanged_ids = set(now.index[now.isin(set(before.values))])
    new_ids = set(now.index) - set(before.index)
    unchanged = train_rows["source_id"].isin(unchanged_ids).to_numpy()
    unchanged_positions = np.flatnonzero(unchanged)
    replayed = round(replay_share * len(unchanged_positions))
    chosen = np.random.default_rng(seed).choice(unchanged_positions, size=replayed, replace=False)
    keep = ~unchanged
    keep[chosen] = True
    plan = ContinuationPlan(
        start=start, records_new=len(new_ids), records_edited=len(now) - len(unchanged_ids) - len(new_ids),
        records_unchanged=len(unchanged_ids), rows_changed=int((~unchanged).sum()),
        rows_unchanged=len(unchanged_positions), rows_replayed=replayed, replay_share=replay_share,
    )
    if not keep.any():
        raise ContinuationError(
            f"train.init_from=champion: every train row is one {start.model_name} version {start.version} was trained "
            f"on, and train.replay_unchanged={replay_share:g} replays none of them: nothing to train -> raise "
            "train.replay_unchanged, or set train.init_from=none")
    return keep, plan


LORA_SHAPE = ("lora_r", "lora_alpha", "target_modules", "use_rslora", "use_dora")  # what a continued adapter keeps


def check_lora_settings(champion_train: dict, train_config, where: str) -> None:
    """ContinuationError naming every LoRA setting (LORA_SHAPE) of the champion's training config (`champion_train`,
    from its version record `where`) that differs from `train_config`: continued weights keep the champion's shape
    and scale."""
    differences = [f"train.{key}: {champion_train.get(key)!r} in the champion, {getattr(train_config, key)!r} here"
                   for key in LORA_SHAPE if champion_train.get(key) != getattr(train_config, key)]
    if differences:
        raise ContinuationError(
            f"train.init_from=champion: the champion ({where}) was trained with other LoRA settings: "
            + "; ".join(differences) + " -> set them to the champion's values, or set train.init_from=none to train "
            "a fresh adapter")
