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

import numpy as np
import pandas as pd

from data_contracts import CONVERSATIONS, PARAPHRASES, RAW
from data_contracts.base import quarantine_rows
from loraflow.config.pipeline import config_hash
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS, digests16
from loraflow.runtime.stage_output import StageResult, StageWriter, read_input, read_input_batches
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.stage_task import stage_task
from loraflow.synthesizers import SYNTHESIZERS
from loraflow.synthesizers.common import CONVERSATION_COLUMNS, gc_paused, skipped_frame
from loraflow.synthesizers.duplicates import conflicting_duplicates
from tasks.shard import id_column_for, row_ids

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
    frame_configs = source_configs(config, kinds or [None] * len(raw_frames))
    for frame, frame_config in zip(raw_frames, frame_configs):
        check_columns([frame], frame_config)
    outputs = synthesize_sources(raw_frames, frame_configs, paraphrases)
    rows_of, places = output_positions(outputs)
    everything = pd.concat([conversations for *_, conversations, _, _ in outputs], ignore_index=True)
    outputs = with_rows_set_aside(outputs, conflicting_duplicates(everything, rows_of, places, config.duplicate_ids), rows_of)
    return assembled(outputs)


def source_configs(config: SynthesizeConfig, kinds: list[str | None]) -> list[SynthesizeConfig]:
    """The config each source is synthesized with: its own `synthesizer:` kind, else config.kind."""
    return [config if not kind or kind == config.kind else config.model_copy(update={"kind": kind}) for kind in kinds]


def synthesize_sources(raw_frames: list[pd.DataFrame], frame_configs: list[SynthesizeConfig],
                       paraphrases: dict[str, list[str]] | None) -> list[tuple]:
    """Per source (rows, module, options, conversations, skipped, extra arguments); each source is synthesized on
    its own frame, so a row's quarantine copy has only its own columns."""
    outputs = []
    for frame, frame_config in zip(raw_frames, frame_configs):
        module, options = SYNTHESIZERS[frame_config.kind], getattr(frame_config, frame_config.kind)
        rows = frame.reset_index(drop=True)
        extra = extra_arguments(frame_config.kind, paraphrases)
        with gc_paused():
            conversations, skipped = module.synthesize(rows, options, **extra)
        outputs.append((rows, module, options, conversations, skipped, extra))
    return outputs


def assembled(outputs: list[tuple], first_row: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sources' outputs as one (conversations, quarantine); `first_row`: the first input row's position."""
    conversation_parts, quarantine_parts, extra_stats = [], [], {"rows_expanded": 0}
    offset = first_row
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


def output_positions(outputs: list[tuple]) -> tuple[list[int], dict[int, str]]:
    """(each conversation's input row position, across all sources; position -> '<source>:<_row>')."""
    places, rows_of, offset = {}, [], 0
    for rows, _, _, conversations, _, _ in outputs:
        keys = list(zip(rows["_source"].tolist(), rows["_row"].tolist()))
        position = dict(zip(keys, range(offset, offset + len(rows))))
        rows_of += [position[key] for key in zip(conversations["source"].tolist(), conversations["source_row"].tolist())]
        places.update((offset + i, f"{source}:{row}") for i, (source, row) in enumerate(keys))
        offset += len(rows)
    return rows_of, places


def with_rows_set_aside(outputs: list[tuple], set_aside: dict[int, tuple[list[str], str]], rows_of: list[int]) -> list[tuple]:
    """The outputs with the conversations of `set_aside` rows (position -> (columns, reason)) moved to `skipped`, one
    entry per emitted unit (kind)."""
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
    return stats_of(conversation_counts(conversations), quarantine, rows_in, config)


def conversation_counts(conversations: pd.DataFrame, before: dict | None = None) -> dict:
    """Conversations by kind and by phrasing set (first-seen order) and the synthesizers' own counts, added to `before`."""
    before = before or {"by_kind": {}, "by_phrasing_set": {}, "attrs": {}}
    added = {"by_kind": counts(conversations["kind"]), "by_phrasing_set": counts(conversations["phrasing_set"]),
             "attrs": conversations.attrs.get("stats", {})}
    return {part: {key: before[part].get(key, 0) + added[part].get(key, 0) for key in {**before[part], **added[part]}}
            for part in before}


def stats_of(conversations: dict, quarantine: pd.DataFrame, rows_in: int, config: SynthesizeConfig) -> dict:
    """The run summary's counts from `conversation_counts` and the quarantine rows."""
    skipped_by_column: dict[str, dict[str, int]] = {}
    for kind, columns in zip(quarantine["kind"].tolist(), quarantine["columns"].tolist()):
        for column in columns:
            skipped_by_column.setdefault(kind, {}).setdefault(column, 0)
            skipped_by_column[kind][column] += 1
    stats = dict(conversations["attrs"])
    if "rows_expanded" not in stats:  # frames built by hand: one synthesizer, the configured one
        expansion = SYNTHESIZERS[config.kind].expansion(getattr(config, config.kind))
        stats["rows_expanded"] = expanded_rows(rows_in, quarantine["kind"].tolist(), *expansion)
    return {
        "synthesizer": config.kind,
        "conversations_by_kind": conversations["by_kind"],
        "conversations_by_phrasing_set": conversations["by_phrasing_set"],
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
    paraphrases_ref: ArtifactRef | None = None, batch_rows: int = ROW_GROUP_ROWS,
) -> StageResult:
    """Read the RAW artifacts (and the accepted paraphrases, if any) a batch at a time, synthesize, and write
    CONVERSATIONS plus the quarantine (runs without Prefect): the same rows as `synthesize_frame` on whole tables,
    because synthesizers work row by row and the one check across rows (an id on rows with different facts) runs
    first over the rows whose id is not unique (`conflicting_rows`)."""
    if not raw_refs:
        raise SynthesizeError("synthesize: no input artifacts -> configure at least one source")
    paraphrases = read_paraphrases(store, paraphrases_ref) if paraphrases_ref is not None else None
    frame_configs = source_configs(config, kinds or [None] * len(raw_refs))
    for ref, frame_config in zip(raw_refs, frame_configs):
        check_columns([first_rows(store, ref)], frame_config)
    set_aside = conflicting_rows(store, raw_refs, frame_configs, paraphrases, config.duplicate_ids)
    output = StageWriter(store, stage="synthesize", contract=CONVERSATIONS, config_hash=config_hash(config), row_group_rows=batch_rows)
    made, quarantined, rows_in, paraphrased = None, [], 0, 0
    try:
        for ref, frame_config in zip(raw_refs, frame_configs):
            for rows in read_input_batches(store, ref, RAW, batch_rows):
                outputs = synthesize_sources([rows], [frame_config], paraphrases)
                rows_of, places = output_positions(outputs)
                here = {position: set_aside[place] for position, place in places.items() if place in set_aside}
                conversations, quarantine = assembled(with_rows_set_aside(outputs, here, rows_of), first_row=rows_in)
                output.add(conversations, quarantine)
                made, rows_in = conversation_counts(conversations, made), rows_in + len(rows)
                quarantined.append(quarantine)
                paraphrased += int(conversations["id"].str.contains(r":p\d+$").sum())
        quarantine = pd.concat(quarantined, ignore_index=True)
        if not sum(made["by_kind"].values()):
            top = quarantine["reason"].value_counts().head(5).to_dict()
            raise SynthesizeError(
                f"synthesize ({config.kind}): all {rows_in} input rows were skipped; top reasons: {top} "
                f"-> check the column mapping under synthesize.{config.kind} and the data"
            )
    except BaseException:
        output.abort()
        raise
    stats = stats_of(made, quarantine, rows_in, config)
    if paraphrases is not None:  # provenance: which trained phrasings the paraphraser wrote (ids end in :p<j>)
        stats["paraphrases"] = paraphrases
        stats["paraphrase_conversations"] = paraphrased
    return output.finish(rows_in=rows_in, stats=stats)


def first_rows(store: ArtifactStore, ref: ArtifactRef) -> pd.DataFrame:
    """The first row of an artifact (its columns, for the column check before any row is synthesized)."""
    return next(iter(store.read_batches(ref, batch_rows=1))).to_pandas()


def conflicting_rows(store: ArtifactStore, raw_refs: list[ArtifactRef], frame_configs: list[SynthesizeConfig],
                     paraphrases: dict[str, list[str]] | None, keep: str) -> dict[str, tuple[list[str], str]]:
    """'<source>:<_row>' -> (columns, reason) for every row set aside as a duplicate id with different facts, over all
    sources: only rows whose id (the shard key, tasks/shard.row_ids) is on more than one row are read and synthesized
    again, and compared exactly as synthesize_frame compares all rows."""
    id_columns = [id_column_for(frame_config, frame_config.kind) for frame_config in frame_configs]

    def row_digests(ref, id_column):
        names = store.schema(ref).names
        columns = ["_source", "_row"] + ([id_column] if id_column in names else [])
        for batch in store.read_batches(ref, columns=columns):
            yield digests16(row_ids(batch.to_pandas(), id_column))

    digests = [d for ref, id_column in zip(raw_refs, id_columns) for d in row_digests(ref, id_column)]
    unique, repeats = np.unique(np.concatenate(digests), return_counts=True) if digests else (np.zeros(0, "S16"),) * 2
    repeated = unique[repeats > 1]
    if not len(repeated):
        return {}
    frames = []
    for ref, id_column in zip(raw_refs, id_columns):
        parts = [rows[np.isin(digests16(row_ids(rows, id_column)), repeated)] for rows in read_input_batches(store, ref, RAW)]
        frames.append(pd.concat(parts, ignore_index=True))
    outputs = synthesize_sources(frames, frame_configs, paraphrases)
    rows_of, places = output_positions(outputs)
    everything = pd.concat([conversations for *_, conversations, _, _ in outputs], ignore_index=True)
    return {places[row]: found for row, found in conflicting_duplicates(everything, rows_of, places, keep).items()}


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
