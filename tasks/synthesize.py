"""Synthesize: RAW rows of one or more sources -> CONVERSATIONS, via the synthesizer named by config.kind.

Row accounting: rows_in counts input rows; rows_out counts conversations. A synthesizer turns each input row
into `units` (anime_qa: one per question kind; others: one), and each emitted unit into `per_unit`
conversations (anime_qa: one per phrasing); every unit it sets aside becomes one quarantine row (the input
row verbatim, with the reason, `kind` and `columns`). So, computed from the configuration and the number of
skipped units rather than from the output,
    rows_expanded = rows_in * (units - 1) + emitted_units * (per_unit - 1)
and rows_in + rows_expanded == rows_out + rows_quarantined unless a synthesizer lost or invented a row.
"""

import difflib
from collections import Counter

import pandas as pd

from data_contracts import CONVERSATIONS, PARAPHRASES, RAW
from data_contracts.base import quarantine_rows
from loraflow.config.pipeline import config_hash
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.runtime.stage_output import StageResult, read_input, write_stage_output
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.stage_task import stage_task
from loraflow.synthesizers import SYNTHESIZERS
from loraflow.synthesizers.common import CONVERSATION_COLUMNS, gc_paused, skipped_frame
from loraflow.synthesizers.duplicates import conflicting_duplicates

__all__ = ["SynthesizeError", "column_problems", "synthesize_frame", "synthesize_stats", "run_synthesize", "synthesize_task"]

PROVENANCE = ("_source", "_row")


class SynthesizeError(ValueError):
    """Input the configured synthesizer cannot work on; the message names the columns and config keys to set."""


def check_columns(raw_frames: list[pd.DataFrame], config: SynthesizeConfig) -> None:
    """Raise one SynthesizeError listing every configured column missing from any source."""
    module, options = SYNTHESIZERS[config.kind], getattr(config, config.kind)
    problems = []
    for position, frame in enumerate(raw_frames):
        wanted = dict.fromkeys(PROVENANCE) | {column: key for key, column in module.required_columns(options).items()}
        absent = [(column, key) for column, key in wanted.items() if column not in frame.columns]
        if not absent:
            continue
        name = str(frame["_source"].iloc[0]) if "_source" in frame.columns and len(frame) else f"#{position}"
        listed = ", ".join(
            f"{column!r} (set synthesize.{config.kind}.{key})" if key else f"{column!r} (added by ingest: pass a RAW artifact)"
            for column, key in absent
        )
        existing = ", ".join(repr(column) for column in frame.columns if column not in PROVENANCE)
        problems.append(f"  source {name!r} has no column {listed}; its columns are: {existing}")
    if problems:
        raise SynthesizeError(
            f"synthesize ({config.kind}): configured column(s) not found:\n" + "\n".join(problems)
            + f"\n-> set those keys to the column names in your data (or choose another synthesize.kind)"
        )


def column_problems(config: SynthesizeConfig, sources: list[tuple[str, str | None, list[str]]]) -> list[str]:
    """'key: problem -> fix' for every column a synthesizer is configured to read that its source lacks, before
    any row is read. `sources`: (name, its own `synthesizer:` or None, its columns) of the sources whose columns
    are known (loraflow.sources.source_columns)."""
    problems = []
    for name, kind, columns in sources:
        kind = kind or config.kind
        for key, column in SYNTHESIZERS[kind].required_columns(getattr(config, kind)).items():
            if column in columns:
                continue
            close = difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"synthesize.{kind}.{key}: {column!r} is not a column of source {name!r} -> {hint}set it to "
                            f"one of its columns: {columns}")
    return problems


def synthesize_frame(
    raw_frames: list[pd.DataFrame], config: SynthesizeConfig, kinds: list[str | None] | None = None,
    paraphrases: dict[str, list[str]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RAW frames -> (conversations, quarantine rows for every skipped unit). Pure; sources in order.

    `kinds[i]` names the synthesizer for frame i (a source's `synthesizer:`); None uses config.kind.
    `paraphrases`: kind -> extra trained phrasings for table_qa (the paraphrase stage's output).
    The quarantine frame has the QUARANTINE contract's columns plus `kind` and `columns` (the source columns
    that caused the skip); `row_index` is the row's position in the concatenated input.
    """
    if not raw_frames:
        raise SynthesizeError("synthesize: no input artifacts -> configure at least one source")
    frame_configs = [config if not kind or kind == config.kind else config.model_copy(update={"kind": kind})
                     for kind in (kinds or [None] * len(raw_frames))]
    for frame, frame_config in zip(raw_frames, frame_configs):
        check_columns([frame], frame_config)
    # Each source is synthesized on its own frame, so a row's quarantine copy has only its own columns.
    outputs = []
    for frame, frame_config in zip(raw_frames, frame_configs):
        module, options = SYNTHESIZERS[frame_config.kind], getattr(frame_config, frame_config.kind)
        rows = frame.reset_index(drop=True)
        extra = extra_arguments(frame_config.kind, paraphrases)
        with gc_paused():
            conversations, skipped = module.synthesize(rows, options, **extra)
        outputs.append((rows, module, options, conversations, skipped, extra))
    outputs = without_conflicting_duplicates(outputs, config.duplicate_ids)

    conversation_parts, quarantine_parts, extra_stats = [], [], {"rows_expanded": 0}
    offset = 0
    for rows, module, options, conversations, skipped, extra in outputs:
        for key, count in conversations.attrs.get("stats", {}).items():
            extra_stats[key] = extra_stats.get(key, 0) + count
        extra_stats["rows_expanded"] += expanded_rows(len(rows), skipped["kind"].tolist(), *module.expansion(options, **extra))
        conversation_parts.append(conversations)
        set_aside = rows.iloc[skipped["row"].to_numpy()].set_axis(skipped["row"].to_numpy() + offset)
        quarantine = quarantine_rows(set_aside, pd.Series(skipped["reason"].tolist(), index=set_aside.index), "synthesize")
        quarantine["kind"] = skipped["kind"].tolist()
        quarantine["columns"] = skipped["columns"].tolist()
        quarantine_parts.append(quarantine)
        offset += len(rows)
    conversations = pd.concat(conversation_parts, ignore_index=True)[CONVERSATION_COLUMNS]
    conversations.attrs = {"stats": extra_stats}
    return conversations, pd.concat(quarantine_parts, ignore_index=True)


def extra_arguments(kind: str, paraphrases: dict[str, list[str]] | None) -> dict:
    """Keyword arguments a synthesizer takes beyond (rows, options): table_qa's paraphrases, when there are any."""
    return {"paraphrases": paraphrases} if kind == "table_qa" and paraphrases else {}


def without_conflicting_duplicates(outputs: list[tuple], keep: str) -> list[tuple]:
    """Per source (rows, module, options, conversations, skipped, extra arguments): the conversations of rows whose
    id another row holds with different facts moved to `skipped`, one entry per emitted unit (kind), across all
    sources."""
    keys, rows_of, offset = [], [], 0
    for rows, _, _, conversations, _, _ in outputs:
        position = dict(zip(zip(rows["_source"].tolist(), rows["_row"].tolist()), range(offset, offset + len(rows))))
        rows_of += [position[key] for key in zip(conversations["source"].tolist(), conversations["source_row"].tolist())]
        keys += [f"{source}:{row}" for source, row in zip(rows["_source"].tolist(), rows["_row"].tolist())]
        offset += len(rows)
    everything = pd.concat([conversations for *_, conversations, _, _ in outputs], ignore_index=True)
    set_aside = conflicting_duplicates(everything, rows_of, dict(enumerate(keys)), keep)
    if not set_aside:
        return outputs
    cleaned, offset, start = [], 0, 0
    for rows, module, options, conversations, skipped, extra in outputs:
        own = rows_of[start:start + len(conversations)]
        drop = pd.Series([row in set_aside for row in own], index=conversations.index, dtype=bool)
        units = dict.fromkeys((row, kind) for row, kind, dropped in zip(own, conversations["kind"].tolist(), drop) if dropped)
        added = skipped_frame([row - offset for row, _ in units], [kind for _, kind in units],
                              [set_aside[row][0] for row, _ in units], [set_aside[row][1] for row, _ in units])
        kept = conversations[~drop].reset_index(drop=True)
        kept.attrs = conversations.attrs
        cleaned.append((rows, module, options, kept, pd.concat([skipped, added], ignore_index=True), extra))
        offset, start = offset + len(rows), start + len(conversations)
    return cleaned


def expanded_rows(rows_in: int, skipped_kinds: list[str], units: int, per_unit: int | dict[str, int]) -> int:
    """rows_expanded (module docstring) from a synthesizer's expansion; `per_unit` may be {kind: conversations}."""
    if isinstance(per_unit, int):
        return rows_in * (units - 1) + (rows_in * units - len(skipped_kinds)) * (per_unit - 1)
    skipped = Counter(skipped_kinds)
    return rows_in * (units - 1) + sum((rows_in - skipped[kind]) * (count - 1) for kind, count in per_unit.items())


def synthesize_stats(conversations: pd.DataFrame, quarantine: pd.DataFrame, rows_in: int, config: SynthesizeConfig) -> dict:
    """Counts for the run summary, including rows_expanded (see module docstring)."""
    skipped_by_column: dict[str, dict[str, int]] = {}
    for kind, columns in zip(quarantine["kind"].tolist(), quarantine["columns"].tolist()):
        for column in columns:
            skipped_by_column.setdefault(kind, {}).setdefault(column, 0)
            skipped_by_column[kind][column] += 1
    stats = dict(conversations.attrs.get("stats", {}))
    if "rows_expanded" not in stats:  # frames built by hand: one synthesizer, the configured one
        expansion = SYNTHESIZERS[config.kind].expansion(getattr(config, config.kind))
        stats["rows_expanded"] = expanded_rows(rows_in, quarantine["kind"].tolist(), *expansion)
    return {
        "synthesizer": config.kind,
        "conversations_by_kind": counts(conversations["kind"]),
        "conversations_by_phrasing_set": counts(conversations["phrasing_set"]),
        "skipped_by_kind": counts(quarantine["kind"]),
        "skipped_by_column": skipped_by_column,
        "skip_reasons": {str(k): int(n) for k, n in quarantine["reason"].value_counts().head(20).items()},
        **stats,
    }


def counts(values: pd.Series) -> dict[str, int]:
    """Value counts in first-seen order, as plain JSON types."""
    return {str(value): int(count) for value, count in values.value_counts(sort=False).items()}


def run_synthesize(
    raw_refs: list[ArtifactRef], config: SynthesizeConfig, store: ArtifactStore, kinds: list[str | None] | None = None,
    paraphrases_ref: ArtifactRef | None = None,
) -> StageResult:
    """Read the RAW artifacts (and the accepted paraphrases, if any), synthesize, and write CONVERSATIONS plus the
    quarantine (runs without Prefect)."""
    raw_frames = [read_input(store, ref, RAW) for ref in raw_refs]
    paraphrases = read_paraphrases(store, paraphrases_ref) if paraphrases_ref is not None else None
    conversations, quarantine = synthesize_frame(raw_frames, config, kinds, paraphrases)
    rows_in = sum(len(frame) for frame in raw_frames)
    if len(conversations) == 0:
        top = quarantine["reason"].value_counts().head(5).to_dict()
        raise SynthesizeError(
            f"synthesize ({config.kind}): all {rows_in} input rows were skipped; top reasons: {top} "
            f"-> check the column mapping under synthesize.{config.kind} and the data"
        )
    stats = synthesize_stats(conversations, quarantine, rows_in, config)
    if paraphrases is not None:  # provenance: which trained phrasings the paraphraser wrote (ids end in :p<j>)
        stats["paraphrases"] = paraphrases
        stats["paraphrase_conversations"] = int(conversations["id"].str.contains(r":p\d+$").sum())
    return write_stage_output(
        store, stage="synthesize", contract=CONVERSATIONS, frame=conversations, rows_in=rows_in,
        config_hash=config_hash(config), quarantined=quarantine, stats=stats,
    )


def read_paraphrases(store: ArtifactStore, ref: ArtifactRef) -> dict[str, list[str]]:
    """kind -> accepted paraphrases, in order, from the paraphrase stage's PARAPHRASES artifact."""
    frame = read_input(store, ref, PARAPHRASES)
    phrasings: dict[str, list[str]] = {}
    for kind, paraphrase in zip(frame["kind"].tolist(), frame["paraphrase"].tolist()):
        phrasings.setdefault(kind, []).append(paraphrase)
    return phrasings


@stage_task(name="synthesize")
def synthesize_task(
    raw_refs: list[ArtifactRef], config: SynthesizeConfig, store_root: str, kinds: list[str | None] | None = None,
    paraphrases_ref: ArtifactRef | None = None,
) -> StageResult:
    """Prefect task around run_synthesize; cached on the input artifacts' hashes, the config and this code."""
    return run_synthesize(raw_refs, config, ArtifactStore(store_root), kinds, paraphrases_ref)
