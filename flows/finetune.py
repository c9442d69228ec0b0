"""The whole pipeline: prepare -> train -> evaluate -> (gate) -> publish.

Parameters are one PipelineConfig, so the Prefect UI renders a typed form. Training, evaluation and publish
outputs live in content-addressed folders of the store (named by what they were made from), so an unchanged
re-run reuses the adapter and its evaluation, and a model already published for the same adapter is not
published again. With an s3:// store those folders are in this host's folder for it and are shipped to the store,
so another host reuses them (loraflow.runtime.store_folders; locks.backend object-store or redis locks them across
hosts). Every publish is a numbered version of the model name (the config's `name`) and becomes its
champion (loraflow.publishing.registry, `<store>/published/`: in the bucket for an s3:// store, so every host
sees one registry) and a materialization of the Prefect asset
`loraflow://models/<name>` whose upstream assets are the sources (loraflow.ops.assets). A retrained adapter is
evaluated beside the champion, and the gate (its own cheap step on the cached evaluation) refuses it if it is
worse, so a regression is never published. With train.init_from=champion the adapter continues from the
champion's (loraflow.publishing.champion_start), on the rows changed since its data plus a replayed share; with
publish.target=hf_hub the Hub repo's tag `champion` moves to every version published as champion. A refused run ends Completed(name="Refused") (or Failed, with
eval.gate.fail_on_refusal) and emits the event loraflow.model.refused (loraflow.ops.refusal).
"""

import hashlib
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows.prepare import artifact_key, new_run_dir, prepare_stages, record_stage
from loraflow.runtime.cache_keys import STAGE_CACHE
from loraflow.config.evaluate import HEADLINE_METRICS
from loraflow.config.pipeline import PipelineConfig, config_hash
from loraflow.ops.assets import materialize_published_model, source_asset_key
from loraflow.ops.refusal import emit_refusal, refusal_message, refused_state
from loraflow.publishing.champion_start import champion_start
from loraflow.publishing.hub import move_champion_tag_to
from loraflow.publishing.merge import MODEL_MANIFEST
from loraflow.publishing.registry import model_dir_here, open_registry
from loraflow.runtime.code_version import code_version
from loraflow.runtime.run_cost import cost_line, run_cost, timed
from loraflow.sources import source_locations
from loraflow.tracking.mlflow_run import log_best_effort, pipeline_params, set_champion_alias
from loraflow.publishing.model_card import TRAIN_RAN_FIELDS, CardFacts, SourceFacts
from loraflow.runtime.run_folder import link_model
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.store_folders import store_url
from loraflow.runtime.stage_task import folder_lock_manager, local_root, run_locked, run_stage, shared_lock_manager
from loraflow.runs.summary import CandidateSummary, CostSummary, EvalSummary, PublishSummary, RunSummary, TrainSummary
from loraflow.training.checkpoints import ADAPTER_MANIFEST, base_model_fingerprint
from loraflow.training.continuation import StartAdapter
from tasks.dpo import dpo_task
from tasks.evaluate import evaluate_task
from tasks.gate import gate_task
from tasks.preference import pairs_task
from tasks.publish import publish_task
from tasks.train import train_task


# The folder stages are keyed by what their folders are made from, never by where this host keeps the base model and
# the folders (model_dir, adapter_dir, output_dir: paths in this host's loraflow cache), so hosts that share an s3://
# store share their results (the folders travel through the store: loraflow.runtime.store_folders).
FOLDER_STAGE_CACHE = STAGE_CACHE - "model_dir" - "output_dir"
# Train once per data, base model (base_fingerprint) and training config: the tracker's run name and params (the
# whole pipeline config) do not make another adapter.
TRAIN_CACHE = FOLDER_STAGE_CACHE - "run_name" - "tracking_params"
# DPO once per SFT adapter, pairs and DPO settings (`fingerprint` holds all three).
DPO_CACHE = FOLDER_STAGE_CACHE - "sft_adapter_dir"
# Evaluate once per adapter, data, eval settings and champion (previous_fingerprint), never per gate threshold: the
# gate step decides on the cached metrics. eval_settings (the eval config's hash without eval.gate) stands for
# eval_config in the key.
EVALUATE_CACHE = FOLDER_STAGE_CACHE - "eval_config" - "adapter_dir" - "previous_model_dir"
# Publish once per adapter (adapter_fingerprint, which holds the base model's), publish config and destination (not
# per run: the card's run-specific text does not make a new model).
PUBLISH_CACHE = (FOLDER_STAGE_CACHE - "adapter_dir" - "card" - "verify_texts" - "system_prompt" - "trust_remote_code"
                 - "tracking")


@flow(name="finetune", log_prints=True)
def finetune_flow(config: PipelineConfig) -> dict:
    """Sources to an evaluated, gated, merged and published model; returns the run summary (summary.json's JSON:
    loraflow.runs.summary.RunSummary)."""
    logger = get_run_logger()
    started = time.perf_counter()
    run_dir = new_run_dir(config)

    # ---- data half
    summary = prepare_stages(config, run_dir)
    tokens, model_dir, store_root = summary.tokens, summary.model_dir, summary.store
    seconds = {"prepare": summary.prepare_seconds}  # this run's seconds per stage, for its cost
    locks = folder_lock_manager(config.locks, store_root)  # train..publish: across hosts unless locks.backend=local

    # ---- train: the adapter folder is named by data + base model + training config (+ the champion's adapter it
    # continues from, train.init_from=champion); one run trains at a time
    base_fingerprint = base_model_fingerprint(Path(model_dir))
    start = start_adapter(config, store_root, tokens)
    train_dir = work_dir(store_root, "train", tokens.sha256, base_fingerprint, config_hash(config.train),
                         *([start.adapter_sha256] if start else []))
    with timed(seconds, "train"):
        trained, cached = run_locked(
            train_task, store_root, lambda r: (Path(r.adapter_dir) / ADAPTER_MANIFEST).exists(), cache_policy=TRAIN_CACHE,
            lock_manager=locks, folder=train_dir,
            tokens=tokens, model_dir=model_dir, train_config=config.train, output_dir=str(train_dir),
            store_root=store_root, base_fingerprint=base_fingerprint, trust_remote_code=config.model.trust_remote_code,
            run_name=config.name, tracking_params=pipeline_params(config.model_dump(mode="json")), start=start,
        )
    summary.train = TrainSummary(**trained.model_dump(), cached=cached)
    summary.tracking = trained.tracking  # the MLflow run of this adapter

    # ---- preference (preference.enabled): pairs from the trained rows, DPO on the same adapter; what follows
    # evaluates, gates and publishes the DPO adapter
    if config.preference.enabled:
        trained = preference_step(config, summary, trained, seconds, locks)

    # ---- evaluate base vs fine-tuned (and vs the champion, if another adapter made it); gate
    previous = champion_to_beat(store_root, config.name, exclude_fingerprint=trained.fingerprint)
    previous_model_dir, previous_fingerprint = (previous["model_dir"], previous["adapter_fingerprint"]) if previous else (None, "")
    # Keyed without eval.gate (EVALUATE_CACHE): a changed threshold re-decides below, without generating again.
    eval_dir = work_dir(store_root, "eval", trained.fingerprint, config_hash(config.eval, exclude={"gate"}),
                        str(config.format.system_prompt), previous_fingerprint)
    with timed(seconds, "evaluate"):
        evaluation, cached = run_locked(
            evaluate_task, store_root, lambda r: Path(r.metrics_path).exists(), cache_policy=EVALUATE_CACHE,
            lock_manager=locks, folder=eval_dir,
            eval_settings=config_hash(config.eval, exclude={"gate"}), previous_fingerprint=previous_fingerprint,
            tokens=tokens, model_dir=model_dir, adapter_dir=trained.adapter_dir, eval_config=config.eval,
            output_dir=str(eval_dir), store_root=store_root, adapter_fingerprint=trained.fingerprint,
            system_prompt=config.format.system_prompt, previous_model_dir=previous_model_dir,
            trust_remote_code=config.model.trust_remote_code, tracking=trained.tracking,
        )
    # ---- the gate: its own cheap step on the (cached) metrics
    with timed(seconds, "gate"):
        gate = gate_task(evaluation, config.eval.gate, tracking=trained.tracking)
    summary.cost = CostSummary(**run_cost(seconds, stage_devices(config), config.cost))  # so far: the card's figure
    summary.eval = EvalSummary(base=evaluation.base, finetuned=evaluation.finetuned, previous=evaluation.previous,
                               previous_model_dir=previous_model_dir, gate=gate,
                               report=evaluation.report_path, table=evaluation.table_path, cached=cached,
                               seconds=evaluation.seconds, timing=evaluation.timing)
    summary.candidate = CandidateSummary(base_model_dir=model_dir, adapter_dir=trained.adapter_dir,  # `loraflow ask` it
                                         system_prompt=config.format.system_prompt)

    # ---- publish through the gate, once per adapter and target: a re-run (or a twin run) reuses the publish
    publish_through_gate(config, summary, run_dir, trained, evaluation, gate, seconds, locks)
    if trained.tracking and trained.tracking.url:
        create_link_artifact(key=f"{artifact_key(config.name)}-mlflow-run", link=trained.tracking.url,
                             description="this adapter's MLflow run: curve, eval metrics per model, report, card")
    summary.cost = CostSummary(**run_cost(seconds, stage_devices(config), config.cost))
    if not summary.train.cached:  # what making this adapter cost, on its MLflow run
        log_best_effort(trained.tracking, "cost", logger, metrics=cost_metrics(summary.cost))
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.write(run_dir)
    create_markdown_artifact(key=f"{artifact_key(config.name)}-summary", markdown=summary_markdown(summary),
                             description="loraflow run summary")
    if not gate.passed:  # a refusal nobody can miss: a named end state and an event with the reasons
        message = refusal_message(config.name, gate.failures, str(run_dir))
        logger.warning(message)
        emit_refusal(config.name, gate.failures, gate.reasons, str(run_dir), trained.adapter_dir)
        return refused_state(summary.to_json(), message, fail=config.eval.gate.fail_on_refusal)
    return summary.to_json()


def publish_through_gate(config: PipelineConfig, summary, run_dir: Path, trained, evaluation, gate, seconds: dict,
                         locks=None) -> None:
    """Publish the adapter when the gate passed (once per adapter and target: a re-run reuses the publish), record
    the new version and its champion, link the model from the run folder; sets `summary.publish` either way."""
    logger = get_run_logger()
    tokens, model_dir, store_root = summary.tokens, summary.model_dir, summary.store
    gate_verdict = dict(gate_passed=gate.passed, gate_reasons=gate.reasons, adapter_dir=trained.adapter_dir)
    if not gate.passed:
        summary.publish = PublishSummary(**gate_verdict, published=False)
    else:
        publish_dir = work_dir(store_root, "publish", trained.fingerprint, config_hash(config.publish))
        with timed(seconds, "publish"):
            published, cached = run_locked(
                publish_task, store_root, lambda r: (Path(r.model_dir) / MODEL_MANIFEST).exists(),
                cache_policy=PUBLISH_CACHE, lock_manager=locks, folder=publish_dir,
                model_dir=model_dir, adapter_dir=trained.adapter_dir, publish_config=config.publish,
                output_dir=str(publish_dir), card=card_facts(config, summary, evaluation, gate),
                verify_texts=verification_texts(store_root, tokens, config.publish.verify_prompts),
                system_prompt=config.format.system_prompt, trust_remote_code=config.model.trust_remote_code,
                tracking=trained.tracking, store_root=store_root, adapter_fingerprint=trained.fingerprint,
            )
        summary.publish = PublishSummary(**gate_verdict, **published.model_dump(), published=not cached, reused=cached)
        if cached:
            logger.info("this adapter was already published (%s): nothing new to publish", published.model_dir)
        else:  # a new numbered version of the model name, and the champion
            summary.publish.version = record_version(store_root, config, summary, trained.fingerprint,
                                                     published.model_dump(), gate.reasons)
        summary.publish.run_model_link = str(link_model(run_dir, published.model_dir))
        create_link_artifact(key=f"{artifact_key(config.name)}-model", link=Path(published.model_dir).as_uri(),
                             description="merged model folder (model card: README.md)")
        card_path = Path(published.model_dir) / "README.md"
        if card_path.exists():
            create_markdown_artifact(key=f"{artifact_key(config.name)}-model-card", markdown=card_path.read_text(),
                                     description="model card")


def preference_step(config: PipelineConfig, summary: RunSummary, trained, seconds: dict, locks):
    """The pairs stage, then DPO from the SFT adapter (cached and locked like training); records both in the summary
    and returns `trained` pointing at the DPO adapter, with a fingerprint of SFT adapter + pairs + DPO settings."""
    store = ArtifactStore(summary.store)
    with timed(seconds, "preference"):
        pairs, cached, pair_seconds = run_stage(pairs_task, store, lock_manager=shared_lock_manager(config.locks, store.root),
                                                formatted_ref=summary.formatted, tokens_ref=summary.tokens,
                                                config=config.preference, store_root=store.root)
        record_stage(summary, config.name, "pairs", pairs, cached, pair_seconds, store)
        fingerprint = hashlib.sha256("|".join([trained.fingerprint, pairs.output.sha256, config.train.precision,
                                               config_hash(config.preference, exclude={"enabled"})]).encode()).hexdigest()[:16]
        dpo_dir = work_dir(store.root, "dpo", fingerprint)
        tuned, cached = run_locked(
            dpo_task, store.root, lambda r: (Path(r.adapter_dir) / ADAPTER_MANIFEST).exists(), cache_policy=DPO_CACHE,
            lock_manager=locks, folder=dpo_dir,
            pairs=pairs.output, model_dir=summary.model_dir, sft_adapter_dir=trained.adapter_dir, config=config.preference,
            output_dir=str(dpo_dir), store_root=store.root, fingerprint=fingerprint,
            seed=config.train.seed, precision=config.train.precision, trust_remote_code=config.model.trust_remote_code,
        )
    summary.preference = {**tuned.model_dump(mode="json"), "cached": cached}
    return trained.model_copy(update={"adapter_dir": tuned.adapter_dir, "fingerprint": tuned.fingerprint})


def stage_devices(config: PipelineConfig) -> dict[str, int]:
    """Devices a stage holds where not 1: distributed training's processes (one per GPU; every visible GPU when
    train.num_processes is None, counted as 1 here)."""
    return {"train": config.train.num_processes or 1} if config.train.distributed != "none" else {}


def cost_metrics(cost: CostSummary) -> dict[str, float]:
    """The run's cost as MLflow metrics."""
    metrics = {"cost.device_seconds": cost.total_device_seconds}
    return metrics | ({"cost.price": cost.cost} if cost.cost is not None else {})


def source_asset_keys(config: PipelineConfig) -> list[str]:
    """The Prefect asset key of every place the config's sources read (loraflow.ops.assets.source_asset_key)."""
    return [source_asset_key(location.address, location.local)
            for source in config.sources for location in source_locations(source, config.base_dir)]


def start_adapter(config: PipelineConfig, store_root: str, tokens: ArtifactRef) -> StartAdapter | None:
    """With train.init_from=champion, the champion's adapter to continue from (loraflow.publishing.champion_start);
    None for a fresh adapter (asked for, or nothing to continue from: a warning says why)."""
    if config.train.init_from == "none":
        return None
    start, why_fresh = champion_start(open_registry(store_root, local_root(store_root)), ArtifactStore(store_root),
                                      config.name, config.train, tokens.sha256, local_root(store_root))
    if why_fresh:
        get_run_logger().warning("train.init_from=champion: %s; training a fresh adapter", why_fresh)
    return start


def champion_to_beat(store_root: str, run_name: str, exclude_fingerprint: str) -> dict | None:
    """The champion's record of model name `run_name` (loraflow.publishing.registry), its `model_dir` this host's
    copy (fetched from an s3:// store when another host published it); None when it came from this very adapter (an
    unchanged re-run) or its folder is gone."""
    record = open_registry(store_root, local_root(store_root)).champion(run_name)
    if record is None or record["adapter_fingerprint"] == exclude_fingerprint:
        return None
    here = model_dir_here(record, store_root, local_root(store_root))
    return {**record, "model_dir": str(here)} if (here / MODEL_MANIFEST).exists() else None


def record_version(store_root: str, config: PipelineConfig, summary: RunSummary, adapter_fingerprint: str,
                   published: dict, gate_reasons: list[str]) -> int:
    """Record the model just published as the next version of `config.name`, with its lineage (metrics, data
    fingerprints, the full resolved config, code version, flow-run id), make it the champion and materialize the
    model's asset; returns its number."""
    registry, flow_run_id = open_registry(store_root, local_root(store_root)), flow_run.get_id()
    sources = [source.model_dump(mode="json") for source in summary.sources]
    hub_tag = champion_hub_tag(config, published, f"{config.name}: champion (passed the gate, flow run {flow_run_id})")
    number = registry.add_version(config.name, {
        "adapter_fingerprint": adapter_fingerprint, "published_at": time.time(), **published,
        "model_url": store_url(store_root, local_root(store_root), published["model_dir"]),  # for the other hosts
        "metrics": summary.eval.finetuned, "gate": gate_reasons, "run_dir": summary.run_dir,
        "data": {"sources": sources, "tokens_sha256": summary.tokens.sha256},
        "config": {**config.model_dump(mode="json"), "store": config.store_root(), "runs_dir": str(config.runs_root())},
        "code": code_version(), "flow_run_id": flow_run_id,
        "tracking": summary.tracking.model_dump(mode="json") if summary.tracking else None,
        "init_from": summary.train.continuation.start.model_dump(mode="json") if summary.train.continuation else None,
        "hub_tag": hub_tag,
    })
    registry.move_champion(config.name, number, action="publish", why="passed the gate",
                           by=f"loraflow gate (flow run {flow_run_id})", hub_tag=hub_tag)
    materialize_published_model(config.name, number, source_asset_keys(config), {
        "metrics": {metric: summary.eval.finetuned.get(metric) for metric in HEADLINE_METRICS},
        "sources": [{key: source[key] for key in ("name", "fingerprint", "rows")} for source in sources],
        "tokens_sha256": summary.tokens.sha256, "model_dir": published["model_dir"]})
    note = set_champion_alias(registry.version(config.name, number))
    get_run_logger().info("published %s version %d, now the champion%s", config.name, number, note)
    return number


def champion_hub_tag(config: PipelineConfig, published: dict, message: str) -> dict | None:
    """Move the Hub's `champion` tag to the commit just published (publish.target=hf_hub; None otherwise). Best
    effort: the model is published and its version is recorded either way, so a failure is a warning with the command
    that moves the tag again (`loraflow promote`), and {"error": ...} in the record."""
    try:
        return move_champion_tag_to({**published, "config": {"publish": config.publish.model_dump(mode="json")}}, message,
                                    log=get_run_logger())
    except Exception as error:  # the Hub unreachable, a token without write access: the publish stands
        get_run_logger().warning("the Hub tag `champion` of %s did not move (%s: %s) -> `loraflow promote %s VERSION "
                                 "--why 'move the Hub tag'` moves it", published.get("hub_repo"), type(error).__name__,
                                 str(error)[:300], config.name)
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def work_dir(store_root: str, kind: str, *parts: str) -> Path:
    """A store folder named by the hash of what its contents are made from."""
    return local_root(store_root) / kind / hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def verification_texts(store_root: str, tokens: ArtifactRef, count: int) -> list[str]:
    """Full validation examples (prompt + answer) whose logits the merge check compares."""
    frame = ArtifactStore(store_root).read(tokens)
    rows = frame[frame["split"] == "validation"]
    rows = rows if len(rows) else frame
    return [prompt + reference for prompt, reference in zip(rows["prompt"][:count], rows["reference"][:count])]


def card_facts(config: PipelineConfig, summary: RunSummary, evaluation, gate) -> CardFacts:
    """What the model card says, all taken from this run's summary (no secrets are in it)."""
    train = summary.train
    return CardFacts(
        run_name=config.name,
        base_model=config.model.base,
        base_revision=config.model.revision,
        sources=[SourceFacts(name=s.name, kind=s.kind, location=s.location, sha256=s.fingerprint, rows=s.rows)
                 for s in summary.sources],
        rows={name: stage.rows_out for name, stage in summary.stages.items()},
        synthesizer=config.synthesize.kind,
        template=config.format.template,
        system_prompt=config.format.system_prompt,
        masking="all tokens" if config.tokenize.train_on_inputs else "answer tokens and their end-of-turn only; padding masked by position",
        tokens_sha256=summary.tokens.sha256,
        preflight=summary.preflight,
        train_config=config.train.model_dump(mode="json"),
        train_metrics={k: getattr(train, k) for k in (
            "global_step", "final_loss", "tokens_per_second", "train_rows", "train_tokens", "seconds",
            "peak_memory_bytes", "peak_memory_kind")},
        train_ran={k: getattr(train, k) for k in TRAIN_RAN_FIELDS},
        continued_from=train.continuation.describe() if train.continuation else None,
        eval_report_markdown=Path(evaluation.report_path).read_text(),
        eval_metrics={metric: value for metric in HEADLINE_METRICS
                      if isinstance(value := evaluation.finetuned.get(metric), (int, float)) and not isinstance(value, bool)},
        gate=gate.model_dump(),
        cost_line=cost_line(summary.cost.model_dump()),
    )


def summary_markdown(summary: RunSummary) -> str:
    """The run in a few lines, for the Prefect UI."""
    lines = [f"# {summary.name}", ""] + [f"- **warning:** {warning}" for warning in summary.warnings]
    lines += ["", "| stage | in | out | quarantined | cached | s |", "|---|---|---|---|---|---|"]
    for name, stage in summary.stages.items():
        lines.append(f"| {name} | {stage.rows_in} | {stage.rows_out} | {stage.rows_quarantined} | "
                     f"{stage.cached} | {stage.seconds} |")
    if summary.eval is not None:
        models = {"base": summary.eval.base, "fine-tuned": summary.eval.finetuned}
        if summary.eval.previous:
            models["champion"] = summary.eval.previous
        lines += ["", "| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        for metric in HEADLINE_METRICS:
            lines.append(f"| {metric} | " + " | ".join(str(m.get(metric)) for m in models.values()) + " |")
        train = summary.train
        lines += ["", f"Training: {train.global_step} steps, {train.tokens_per_second} tokens/s, "
                      f"peak memory {train.peak_memory_bytes / 2**30:.2f} GiB ({train.peak_memory_kind}), on {train.device}"]
        lines += ["", f"Gate passed: **{summary.eval.gate.passed}**; published: "
                      f"**{summary.publish.published if summary.publish else None}**"]
    if summary.cost is not None:
        lines += ["", cost_line(summary.cost.model_dump())]
    tracking = summary.tracking
    if tracking:
        where = f"[{tracking.run_id}]({tracking.url})" if tracking.url else f"`{tracking.run_id}`"
        lines += ["", f"MLflow run {where} at `{tracking.tracking_uri}` (experiment {tracking.experiment_id})"]
        if summary.publish and summary.publish.registered_version:
            lines.append(f"Registered model **{summary.publish.registered_model}** version "
                         f"{summary.publish.registered_version}")
    return "\n".join(lines)
