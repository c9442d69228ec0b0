"""The data half: sources -> conversations -> formatted text -> tokens with labels, pre-flight checked.

Every stage is a cached Prefect task whose key covers its input artifacts' hashes, its config, the tokenizer
fingerprint and its own code, so an unchanged re-run is all cache hits and a changed source row recomputes
only what depends on it. Each run writes `summary.json` into its own run folder.
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

from loraflow.config.pipeline import PipelineConfig, check_confinement, source_name
from loraflow.models import resolve_model_dir, tokenizer_fingerprint
from loraflow.store import ArtifactStore
from loraflow.tasking import run_stage
from tasks.format import format_task
from tasks.ingest import ingest_task, source_fingerprint
from tasks.preflight import preflight_task
from tasks.synthesize import synthesize_task
from tasks.tokenize import tokenize_task


@flow(name="prepare", log_prints=True)
def prepare_flow(config: PipelineConfig) -> dict:
    """Prepare training-ready, verified tokens from the configured sources; returns the run summary."""
    run_dir = new_run_dir(config)
    summary = prepare_stages(config, run_dir)
    write_summary(run_dir, summary)
    return summary


def prepare_stages(config: PipelineConfig, run_dir: Path) -> dict:
    """Run ingest -> synthesize -> format -> tokenize -> pre-flight inside the calling flow."""
    logger = get_run_logger()
    started = time.perf_counter()
    # A worker's operator may confine every path a (UI-triggered) config can name to some folders.
    check_confinement(config, os.environ.get("LORAFLOW_DATA_ROOTS"))
    store = ArtifactStore(config.store_root())
    summary = {"name": config.name, "run_dir": str(run_dir), "store": store.root, "sources": [], "stages": {}}

    # ---- ingest: one artifact per source, keyed by the source file's content hash
    raw_results = []
    for source in config.sources:
        fingerprint = source_fingerprint(source, config.base_dir)
        result, cached, seconds = run_stage(
            ingest_task, store, source=source, base_dir=config.base_dir, store_root=store.root,
            source_fingerprint=fingerprint,
        )
        raw_results.append(result)
        name = source_name(source)
        summary["stages"][f"ingest:{name}"] = stage_summary(result, cached, seconds)
        stage_artifact(config.name, f"ingest-{name}", result, store, cached)
        summary["sources"].append({"name": name, "kind": source.kind, "fingerprint": fingerprint,
                                   "location": getattr(source, "path", None) or getattr(source, "repo", None),
                                   "rows": result.rows_out})

    # ---- synthesize: rows -> conversations
    conversations, cached, seconds = run_stage(
        synthesize_task, store, raw_refs=[r.output for r in raw_results], config=config.synthesize, store_root=store.root,
        kinds=[source.synthesizer for source in config.sources],
    )
    summary["stages"]["synthesize"] = stage_summary(conversations, cached, seconds)
    stage_artifact(config.name, "synthesize", conversations, store, cached)

    # ---- format and tokenize: the tokenizer comes first, its fingerprint is part of both cache keys
    tokenizer_dir = str(resolve_model_dir(config.model, config.base_dir))
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    formatted, cached, seconds = run_stage(
        format_task, store, conversations_ref=conversations.output, config=config.format,
        tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=fingerprint, store_root=store.root,
    )
    summary["stages"]["format"] = stage_summary(formatted, cached, seconds)
    stage_artifact(config.name, "format", formatted, store, cached)
    tokens, cached, seconds = run_stage(
        tokenize_task, store, formatted_ref=formatted.output, config=config.tokenize,
        tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=fingerprint, store_root=store.root,
    )
    summary["stages"]["tokenize"] = stage_summary(tokens, cached, seconds)
    stage_artifact(config.name, "tokenize", tokens, store, cached)

    # ---- pre-flight: fail here, not three hours into training
    summary["preflight"] = preflight_task(
        tokens_ref=tokens.output, formatted_ref=formatted.output, format_config=config.format,
        tokenizer_dir=tokenizer_dir, store_root=store.root,
    )

    summary["tokens"] = tokens.output.model_dump()
    summary["formatted"] = formatted.output.model_dump()
    summary["model_dir"] = tokenizer_dir
    summary["prepare_seconds"] = round(time.perf_counter() - started, 3)
    summary["all_cached"] = all(stage["cached"] for stage in summary["stages"].values())
    logger.info("prepare: %s stages, all cached: %s, %.1f s", len(summary["stages"]), summary["all_cached"],
                summary["prepare_seconds"])
    return summary


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


def stage_summary(result, cached: bool, seconds: float) -> dict:
    """The per-stage line of summary.json."""
    return {
        "rows_in": result.rows_in,
        "rows_out": result.rows_out,
        "rows_quarantined": result.rows_quarantined,
        "artifact": result.output.uri,
        "sha256": result.output.sha256,
        "quarantine": result.quarantine.uri if result.quarantine else None,
        "cached": cached,
        "seconds": round(seconds, 3),
        "stats": result.stats,
    }


def new_run_dir(config: PipelineConfig) -> Path:
    """A fresh folder for this run: <runs_dir>/<name>/<UTC time>-<flow run name>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = config.runs_root() / config.name / f"{stamp}-{flow_run.get_name() or 'local'}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_summary(run_dir: Path, summary: dict) -> Path:
    """Write summary.json atomically into the run folder."""
    path = run_dir / "summary.json"
    temp = path.with_suffix(".json.part")
    temp.write_text(json.dumps(summary, indent=2, default=str))
    temp.replace(path)
    return path
