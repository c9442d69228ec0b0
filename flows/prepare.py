"""The data half: sources -> (paraphrases) -> conversations -> formatted text -> tokens with labels, pre-flight checked.

Every stage is a cached Prefect task whose key covers its input artifacts' hashes, its config, the tokenizer
fingerprint and its own code, so an unchanged re-run is all cache hits and a changed source row recomputes
only what depends on it. Each run writes `summary.json` into its own run folder.

With `prepare.shards > 1` the rows are split after ingest by a hash of their id (tasks/shard.py);
synthesize -> format -> tokenize run per shard as mapped tasks of a subflow on the configured task runner
(prefect-dask's DaskTaskRunner for `task_runner: dask`), each shard with its own artifacts and cache keys, so
a changed row recomputes its shard only. Duplicates and leakage are then decided per partition of the examples'
digests, and the shards' outputs are merged back into source order, all as tasks on the same runner (the flow's
process only passes references); pre-flight runs once. The final formatted and tokens artifacts are the same bytes
as the single-process path's, so training's cache keys do not change with the sharding.
"""

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from loraflow.config.pipeline import PipelineConfig, check_confinement, config_hash
from loraflow.config.model import ModelConfig
from loraflow.modeling.base_model import resolve_model_dir, tokenizer_fingerprint
from loraflow.training.checkpoints import base_model_fingerprint
from loraflow.runtime.shards import build_task_runner, map_stage
from loraflow.runtime.stage_output import StageResult, quarantine_reasons
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.stage_task import shared_lock_manager, result_storage, run_stage
from loraflow.runs.summary import RunSummary, ShardSummary, SourceSummary, StageSummary
from tasks.format import format_task
from tasks.ingest import ingest_task
from tasks.paraphrase import paraphrase_inputs, paraphrase_task
from tasks.preflight import preflight_task
from tasks.shard import ShardPlan, id_column_for, merge_formatted_task, shard_task
from tasks.synthesize import synthesize_task
from loraflow.sources import source_fingerprint, source_locations, source_name
from tasks.tokenize import tokenize_merge_task, tokenize_shard_task, tokenize_task
from tasks.tokenize_partitions import PartitionVerdicts, ShardKeys, partition_duplicates_task, partition_leaks_task, shard_keys_task


PER_SHARD_STAGES = ("synthesize", "format", "tokenize")  # sharded: a task per shard each
MERGE_STAGES = ("format:merge", "tokenize:merge")  # sharded: the shards back into one artifact each


@flow(name="prepare", log_prints=True)
def prepare_flow(config: PipelineConfig) -> dict:
    """Prepare training-ready, verified tokens from the configured sources; returns the run summary (summary.json's
    JSON: loraflow.runs.summary.RunSummary)."""
    run_dir = new_run_dir(config)
    summary = prepare_stages(config, run_dir)
    summary.write(run_dir)
    return summary.to_json()


def prepare_stages(config: PipelineConfig, run_dir: Path) -> RunSummary:
    """Run ingest -> synthesize -> format -> tokenize -> pre-flight inside the calling flow (sharded: see the module)."""
    logger = get_run_logger()
    started = time.perf_counter()
    # A worker's operator may confine every path a (UI-triggered) config can name to some folders.
    check_confinement(config, os.environ.get("LORAFLOW_DATA_ROOTS"))
    store = ArtifactStore(config.store_root())
    summary = RunSummary(name=config.name, run_dir=str(run_dir), store=store.root)
    locks = shared_lock_manager(config.locks, store.root)  # None (locks.backend: local): unlocked

    # ---- ingest: one artifact per source, keyed by the source's fingerprint (what its data is now)
    raw_results = []
    for source in config.sources:
        fingerprint = source_fingerprint(source, config.base_dir)
        result, cached, seconds = run_stage(
            ingest_task, store, lock_manager=locks, source=source, base_dir=config.base_dir, store_root=store.root,
            source_fingerprint=fingerprint,
        )
        raw_results.append(result)
        name = source_name(source)
        summary.stages[f"ingest:{name}"] = stage_summary(result, cached, seconds, quarantine_reasons(store, result))
        stage_artifact(config.name, f"ingest-{name}", result, store, cached)
        summary.sources.append(SourceSummary(
            name=name, kind=source.kind, fingerprint=fingerprint, rows=result.rows_out,
            location=", ".join(l.address for l in source_locations(source, config.base_dir))))

    # ---- the tokenizer comes before format and tokenize: its fingerprint is part of both cache keys
    tokenizer_dir = str(resolve_model_dir(config.model, config.base_dir))
    fingerprint = tokenizer_fingerprint(tokenizer_dir)

    # ---- paraphrase (table_qa, when on): once per config, over the templates; synthesize adds what it accepted
    paraphrases = paraphrase_stage(config, store, summary, locks)

    # ---- synthesize -> format -> tokenize: in this process, or per shard on the configured task runner
    raw_refs = [r.output for r in raw_results]
    stages = sharded_stages if config.prepare.shards > 1 else single_process_stages
    formatted, tokens = stages(config, store, raw_refs, tokenizer_dir, fingerprint, summary, paraphrases, locks)

    summary.warnings = (truncation_warnings(summary.stages, config) + split_warnings(summary.stages, config)
                        + control_text_warnings(summary.stages))
    tokenize_stats = (summary.stages.get("tokenize") or summary.stages.get("tokenize:merge")).stats
    summary.untrained_rows = list(tokenize_stats.get("withheld_source_ids", []))
    for warning in summary.warnings:
        logger.warning(warning)

    # ---- pre-flight: fail here, not three hours into training
    # Cached on the tokens' and formatted text's hashes, the tokenizer and its code: a passed check is not re-run.
    checked = preflight_task.with_options(result_storage=result_storage(store.root))(
        tokens_ref=tokens, formatted_ref=formatted, format_config=config.format,
        tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=fingerprint, store_root=store.root, return_state=True,
    )
    summary.preflight = {**checked.result(), "cached": checked.name == "Cached"}

    summary.tokens, summary.formatted, summary.model_dir = tokens, formatted, tokenizer_dir
    summary.prepare_seconds = round(time.perf_counter() - started, 3)
    summary.all_cached = all(stage.cached for stage in summary.stages.values())
    logger.info("prepare: %s stages, all cached: %s, %.1f s", len(summary.stages), summary.all_cached,
                summary.prepare_seconds)
    return summary


def control_text_warnings(stages: dict[str, StageSummary]) -> list[str]:
    """Rows whose data spells a control token of the tokenizer (`<|im_end|>` in an answer): kept as plain text."""
    format_stage = stages.get("format") or stages.get("format:merge")
    count = format_stage.stats.get("control_text_rows", 0) if format_stage else 0
    if not count:
        return []
    return [f"{count} row(s) contain the text of a control token (e.g. <|im_end|>) in a message: it is trained as plain "
            f"characters, never as the control token (format.stats.control_text_rows) -> check those rows if that text "
            f"is not meant to be there"]


def truncation_warnings(stages: dict[str, StageSummary], config: PipelineConfig) -> list[str]:
    """A source that stopped at its `max_rows`: rows after them (those an upstream appends) are left out of every run."""
    warnings = []
    for source in config.sources:
        ingest = stages.get(f"ingest:{source_name(source)}")
        if source.max_rows is not None and ingest is not None and ingest.rows_in >= source.max_rows:
            warnings.append(f"source {source_name(source)!r} stopped at max_rows={source.max_rows}: any rows after the "
                            f"first {source.max_rows} (rows an upstream appends included) are left out -> remove "
                            f"sources[].max_rows (or raise it) to train on all of them")
    return warnings


def split_warnings(stages: dict[str, StageSummary], config: PipelineConfig) -> list[str]:
    """What the user should know about the split before training: rows withheld from training (named), an empty
    validation split (unless asked for)."""
    tokenize = stages.get("tokenize") or stages.get("tokenize:merge")
    stats = tokenize.stats if tokenize else {}
    splits, warnings = stats.get("splits", {}), []
    if stats.get("withheld_rows"):
        named, count = stats["withheld_source_ids"], stats["withheld_rows"]
        more = f" and {count - len(named)} more" if count > len(named) else ""
        warnings.append(f"tokenize.validation_fraction={config.tokenize.validation_fraction} withheld {count} source "
                        f"row(s) whole for validation, never trained, so the model will not know them (source ids: "
                        f"{', '.join(named)}{more}; summary.json untrained_rows) -> set tokenize.validation_fraction: 0 "
                        f"to train every row")
    if splits and not splits.get("validation", 0) and config.tokenize.validation_fraction:
        warnings.append(f"the validation split is empty ({splits.get('train', 0)} train examples, tokenize."
                        f"validation_fraction={config.tokenize.validation_fraction}; the split goes by source id, so few "
                        f"rows can all land in train): evaluation has no validation loss -> raise "
                        f"tokenize.validation_fraction or add rows")
    return warnings


def paraphrase_stage(config: PipelineConfig, store: ArtifactStore, summary: RunSummary,
                     locks=None) -> ArtifactRef | None:
    """The accepted paraphrases of table_qa's trained phrasings (None when paraphrase is off or nothing uses table_qa);
    the paraphraser is the base model unless synthesize.table_qa.paraphrase.model names another."""
    options = config.synthesize.table_qa
    if options is None or not options.paraphrase.enabled or "table_qa" not in config.synthesizer_kinds():
        return None
    model = config.model if options.paraphrase.model is None else ModelConfig(base=options.paraphrase.model)
    model_dir = resolve_model_dir(model, config.base_dir)
    result, cached, seconds = run_stage(
        paraphrase_task, store, lock_manager=locks, options=paraphrase_inputs(options), model_dir=str(model_dir),
        model_fingerprint=base_model_fingerprint(model_dir), store_root=store.root,
        trust_remote_code=model.trust_remote_code,
    )
    record_stage(summary, config.name, "paraphrase", result, cached, seconds, store)
    return result.output


def single_process_stages(config: PipelineConfig, store: ArtifactStore, raw_refs: list[ArtifactRef], tokenizer_dir: str,
                          fingerprint: str, summary: RunSummary, paraphrases: ArtifactRef | None = None,
                          locks=None) -> tuple[ArtifactRef, ArtifactRef]:
    """synthesize -> format -> tokenize, one task each over all rows (locked by `locks`, a Prefect lock manager,
    when set); returns (formatted, tokens)."""
    conversations, cached, seconds = run_stage(
        synthesize_task, store, lock_manager=locks, raw_refs=raw_refs, config=config.synthesize, store_root=store.root,
        kinds=[source.synthesizer for source in config.sources], paraphrases_ref=paraphrases,
    )
    record_stage(summary, config.name, "synthesize", conversations, cached, seconds, store)
    formatted, cached, seconds = run_stage(
        format_task, store, lock_manager=locks, conversations_ref=conversations.output, config=config.format,
        tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=fingerprint, store_root=store.root,
    )
    record_stage(summary, config.name, "format", formatted, cached, seconds, store)
    tokens, cached, seconds = run_stage(
        tokenize_task, store, lock_manager=locks, formatted_ref=formatted.output, config=config.tokenize,
        tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=fingerprint, store_root=store.root,
    )
    record_stage(summary, config.name, "tokenize", tokens, cached, seconds, store)
    return formatted.output, tokens.output


def sharded_stages(config: PipelineConfig, store: ArtifactStore, raw_refs: list[ArtifactRef], tokenizer_dir: str,
                   fingerprint: str, summary: RunSummary, paraphrases: ArtifactRef | None = None,
                   locks=None) -> tuple[ArtifactRef, ArtifactRef]:
    """shard -> (synthesize -> format -> tokenize per shard) -> duplicates and leaks per digest partition -> merge in
    source order, all in a subflow on the task runner; returns (formatted, tokens). Its steps run unlocked (a subflow's
    parameters are data; a twin run writes the same content-addressed bytes), so `locks` is not used here."""
    kinds = [source.synthesizer for source in config.sources]
    per_shard = shards_flow.with_options(task_runner=build_task_runner(config.prepare))(
        raw_refs=raw_refs, kinds=kinds, config=config, tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=fingerprint,
        store_root=store.root, paraphrases_ref=paraphrases,
    )

    # ---- shard: every row to blake2b(row id) mod shards, one RAW artifact per (shard, source)
    [(plan, cached)], seconds = per_shard["shard"]
    summary.stages["shard"] = StageSummary(rows_in=plan.rows_in, rows_out=plan.rows_out, rows_quarantined=0,
                                           cached=cached, seconds=round(seconds, 3),
                                           stats={**plan.stats, "unaccounted_rows": plan.rows_in - plan.rows_out})

    # ---- per shard
    shard_numbers = [shard.number for shard in plan.shards]
    for stage_name in PER_SHARD_STAGES:
        outcomes, seconds = per_shard[stage_name]
        summary.stages[stage_name] = shards_summary(outcomes, shard_numbers, seconds)
        shards_artifact(config.name, stage_name, summary.stages[stage_name])

    # ---- dataset-level, over all rows in source order (run by the subflow on its task runner, not in this process)
    for stage_name in MERGE_STAGES:
        [(result, cached)], seconds = per_shard[stage_name]
        record_stage(summary, config.name, stage_name, result, cached, seconds, store)
    return per_shard["format:merge"][0][0][0].output, per_shard["tokenize:merge"][0][0][0].output


@flow(name="prepare-shards")
def shards_flow(raw_refs: list[ArtifactRef], kinds: list[str | None], config: PipelineConfig, tokenizer_dir: str,
                tokenizer_fingerprint: str, store_root: str,
                paraphrases_ref: ArtifactRef | None = None) -> dict[str, tuple[list[tuple[StageResult | ShardPlan, bool]], float]]:
    """Every step over rows as a task on this subflow's task runner (the Dask workers), the flow's process passing only
    references: shard; synthesize -> format -> tokenize (per-row half) mapped over the shards, a stage at a time; the
    formatted merge; tokenize's dataset-level half hash-partitioned by digest (one partition per shard,
    tasks/tokenize_partitions.py); the tokens merge."""
    store = ArtifactStore(store_root)
    tokenizer = {"tokenizer_dir": tokenizer_dir, "tokenizer_fingerprint": tokenizer_fingerprint}
    source_names = [source_name(source) for source in config.sources]
    sharded = map_stage(shard_task, store, [{}], refs_of=ShardPlan.refs, raw_refs=raw_refs, kinds=kinds,
                        id_columns=[id_column_for(config.synthesize, kind) for kind in kinds], shards=config.prepare.shards,
                        store_root=store_root)
    [(plan, _)] = sharded[0]
    conversations = map_stage(synthesize_task, store, [{"raw_refs": shard.raw_refs, "kinds": shard.kinds} for shard in plan.shards],
                              config=config.synthesize, store_root=store_root, paraphrases_ref=paraphrases_ref)
    formatted = map_stage(format_task, store, [{"conversations_ref": ref} for ref in outputs_of(conversations)],
                          config=config.format, store_root=store_root, **tokenizer)
    tokens = map_stage(tokenize_shard_task, store, [{"formatted_ref": ref} for ref in outputs_of(formatted)],
                       config=config.tokenize, store_root=store_root, **tokenizer)

    # ---- the formatted merge; duplicates and leaks: keys per shard -> per digest partition; the tokens merge
    formatted_merge = map_stage(merge_formatted_task, store, [{}], conversations_refs=outputs_of(conversations),
                                formatted_refs=outputs_of(formatted), source_names=source_names,
                                format_config_hash=config_hash(config.format), store_root=store_root)
    partitions = len(plan.shards)
    keys = map_stage(shard_keys_task, store,
                     [{"conversations_ref": conversations_ref, "tokens_ref": tokens_ref, "shard": number} for number, (conversations_ref, tokens_ref)
                      in enumerate(zip(outputs_of(conversations), outputs_of(tokens)))],
                     refs_of=ShardKeys.refs, source_names=source_names, partitions=partitions,
                     store_root=store_root, **tokenizer)
    duplicates = map_stage(partition_duplicates_task, store,
                           [{"keys_refs": [shard_keys.partitions[number] for shard_keys, _ in keys[0]]} for number in range(partitions)],
                           refs_of=PartitionVerdicts.refs, dedupe=config.tokenize.dedupe, partitions=partitions, store_root=store_root)
    leaks = map_stage(partition_leaks_task, store,
                      [{"survivors_refs": [verdicts.survivors[number] for verdicts, _ in duplicates[0]]} for number in range(partitions)],
                      refs_of=PartitionVerdicts.refs, store_root=store_root)
    tokens_merge = map_stage(tokenize_merge_task, store, [{}], conversations_refs=outputs_of(conversations),
                             tokens_refs=outputs_of(tokens), duplicates_refs=[verdicts.verdicts for verdicts, _ in duplicates[0]],
                             leaks_refs=[verdicts.verdicts for verdicts, _ in leaks[0]], source_names=source_names,
                             config=config.tokenize, store_root=store_root)
    dataset_level = (keys, duplicates, leaks, tokens_merge)
    [(merged, _)] = tokens_merge[0]
    return {"shard": sharded, "synthesize": conversations, "format": formatted, "tokenize": tokens, "format:merge": formatted_merge,
            "tokenize:merge": ([(merged, all(cached for step, _ in dataset_level for _, cached in step))],
                               sum(seconds for _, seconds in dataset_level))}


def outputs_of(mapped: tuple[list[tuple[StageResult, bool]], float]) -> list[ArtifactRef]:
    """The output artifact of each call of a mapped stage, in call order."""
    return [result.output for result, _ in mapped[0]]


def record_stage(summary: RunSummary, run_name: str, stage_name: str, result: StageResult, cached: bool, seconds: float,
                 store: ArtifactStore) -> None:
    """A stage's line in summary.json and its table artifact."""
    summary.stages[stage_name] = stage_summary(result, cached, seconds, quarantine_reasons(store, result))
    stage_artifact(run_name, stage_name.replace(":", "-"), result, store, cached)


def shards_summary(outcomes: list[tuple[StageResult, bool]], shard_numbers: list[int], seconds: float) -> StageSummary:
    """A sharded stage's line in summary.json: totals over its shards (in = out + quarantined holds for the sums),
    and one entry per shard."""
    results = [result for result, _ in outcomes]
    return StageSummary(
        rows_in=sum(r.rows_in for r in results),
        rows_out=sum(r.rows_out for r in results),
        rows_quarantined=sum(r.rows_quarantined for r in results),
        cached=all(cached for _, cached in outcomes),
        seconds=round(seconds, 3),
        stats=summed_stats([r.stats for r in results]),
        shards=[ShardSummary(shard=number, rows_in=r.rows_in, rows_out=r.rows_out, rows_quarantined=r.rows_quarantined,
                             artifact=r.output.uri, sha256=r.output.sha256,
                             quarantine=r.quarantine.uri if r.quarantine else None, cached=cached)
                for number, (r, cached) in zip(shard_numbers, outcomes)],
    )


def summed_stats(stats: list[dict]) -> dict:
    """Shards' stage counts added up (nested dicts key by key); a text value shared by every shard is kept,
    differing ones are listed."""
    total: dict = {}
    for key in dict.fromkeys(key for shard_stats in stats for key in shard_stats):
        values = [shard_stats[key] for shard_stats in stats if key in shard_stats]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            total[key] = sum(values)
        elif all(isinstance(v, dict) for v in values):
            total[key] = summed_stats(values)
        else:
            distinct = list(dict.fromkeys(json.dumps(v, sort_keys=True, default=str) for v in values))
            total[key] = values[0] if len(distinct) == 1 else [json.loads(v) for v in distinct]
    return total


def shards_artifact(run_name: str, stage_name: str, stage: StageSummary) -> None:
    """A table artifact per sharded stage: totals, then rows per shard."""
    rows = [{"shard": "all", "rows in": stage.rows_in, "rows out": stage.rows_out,
             "rows quarantined": stage.rows_quarantined, "cached": stage.cached}]
    rows += [{"shard": shard.shard, "rows in": shard.rows_in, "rows out": shard.rows_out,
              "rows quarantined": shard.rows_quarantined, "cached": shard.cached} for shard in stage.shards]
    create_table_artifact(key=artifact_key(f"{run_name}-{stage_name}"), table=rows,
                          description=f"{stage_name} per shard: rows in/out/quarantined, cached")


def stage_artifact(run_name: str, stage_name: str, result, store: ArtifactStore, cached: bool) -> None:
    """A table artifact per data stage, under a stable key so the UI shows its history across runs."""
    rows = [{"measure": "rows in", "value": result.rows_in}, {"measure": "rows out", "value": result.rows_out},
            {"measure": "rows quarantined", "value": result.rows_quarantined}, {"measure": "cached", "value": cached},
            {"measure": "artifact", "value": result.output.uri}]
    if result.quarantine is not None:
        reasons = store.read(result.quarantine)["reason"].str.split(":").str[0].value_counts().head(5)
        rows += [{"measure": f"quarantine reason: {reason}", "value": int(count)} for reason, count in reasons.items()]
    for name, value in result.stats.items():
        if isinstance(value, (int, float, str, bool)):
            rows.append({"measure": name, "value": value})
        elif isinstance(value, dict) and all(isinstance(v, (int, float, str)) for v in value.values()):
            rows += [{"measure": f"{name}: {key}", "value": v} for key, v in value.items()]
    create_table_artifact(key=artifact_key(f"{run_name}-{stage_name}"), table=rows, description=f"{stage_name}: rows in/out/quarantined and stage counts")


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def stage_summary(result, cached: bool, seconds: float, reasons: list[dict] | None = None) -> StageSummary:
    """The per-stage line of summary.json (`quarantine_reasons`: the top kinds of reason, see top_reasons)."""
    return StageSummary(
        rows_in=result.rows_in, rows_out=result.rows_out, rows_quarantined=result.rows_quarantined,
        artifact=result.output.uri, sha256=result.output.sha256,
        quarantine=result.quarantine.uri if result.quarantine else None, quarantine_reasons=reasons or [],
        cached=cached, seconds=round(seconds, 3), stats=result.stats,
    )


def new_run_dir(config: PipelineConfig) -> Path:
    """A fresh folder for this run: <runs_dir>/<name>/<UTC time>-<flow run name>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = config.runs_root() / config.name / f"{stamp}-{flow_run.get_name() or 'local'}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir

