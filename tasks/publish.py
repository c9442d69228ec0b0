"""publish: merge the adapter into a 16/32-bit base, prove the merge, save, write the card, push.

1. Reload the base unquantized (publish.merge_dtype; never 4-bit: merging into quantized weights rounds the
   adapter away), attach the adapter, take reference logits on a few validation texts, merge_and_unload,
   and fail (MergeVerificationError) if any logit moved more than publish.merge_tolerance.
2. Save in the base's dtype (safetensors) + tokenizer and chat template + generation_config whose EOS ids
   include the template's end-of-turn token + the adapter (adapter/) + README.md (model card from pipeline
   facts) + loraflow.json; re-read the saved weights and compare them bit for bit; manifest written last.
3. target=hf_hub: one commit with every file to a run branch, check the remote list and hashes, then one
   commit to publish.branch (parent = the head seen before, so a concurrent push fails instead of mixing)
   and check again. A request that fails in transit (connection, timeout, 408/429/5xx) is sent again with
   backoff (publish.hub_retries); a commit is skipped when its branch already holds the files, so a retry or
   a re-run after a push that failed half-way commits once. The token comes from a Prefect Secret block or
   HF_TOKEN, and goes only to the client.
4. With training's MLflow run: the model card to it; with publish.register_model, the merged folder as a Model
   Registry version named after the run and tagged with the Prefect flow-run id (loraflow.tracking.mlflow_run).

The merge and its check live in loraflow.publishing.merge, the model card in loraflow.publishing.model_card, the hub push in
loraflow.publishing.hub and `ask` (answers from a published folder, for `loraflow ask`) in loraflow.modeling.inference; this module is
the recipe and the task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from loraflow.config.publish import PublishConfig
from loraflow.publishing.gguf import export_gguf
from loraflow.publishing.gguf_check import gguf_logit_difference_in_place
from loraflow.publishing.hub import assert_no_secret, push_folder, resolve_hub_token
from loraflow.publishing.merge import merge_adapter, save_merged
from loraflow.tracking.mlflow_run import log_best_effort, register_model
from loraflow.publishing.model_card import CardFacts, render_model_card
from loraflow.publishing.result import PublishResult
from loraflow.runtime.store_folders import ship_folder
from loraflow.tracking.report_to import TrackingRun, redact_url

log_default = logging.getLogger("loraflow.publish")


def publish_model(
    model_dir: str | Path,
    adapter_dir: str | Path,
    publish_config: PublishConfig,
    output_dir: str | Path,
    *,
    card: CardFacts,
    verify_texts: list[str],
    system_prompt: str | None = None,
    trust_remote_code: bool = False,
    tracking: TrackingRun | None = None,
    flow_run_id: str | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> PublishResult:
    """Merge, verify, save to `output_dir/model` and, for target=hf_hub, push. Call only when the gate passed.

    `verify_texts`: a few full validation texts (prompt + reference); the first publish.verify_prompts are used.
    `system_prompt`: the one training used (None = template default); stored for `ask`.
    `tracking`: training's MLflow run, which gets the model card (best effort) and, with publish.register_model,
    the merged folder as a registry version tagged with `flow_run_id` (a failure fails the publish).
    """
    log = log or log_default
    started = time.perf_counter()
    model_dir, adapter_dir, output_dir = Path(model_dir), Path(adapter_dir), Path(output_dir)
    token = resolve_hub_token(publish_config.hf_token_secret) if publish_config.target == "hf_hub" else None
    timing = {}
    merged, tokenizer, max_diff = merge_adapter(
        model_dir, adapter_dir, verify_texts[: publish_config.verify_prompts], tolerance=publish_config.merge_tolerance,
        dtype=publish_config.merge_dtype, trust_remote_code=trust_remote_code, timing=timing,
    )
    timing["merge"] = round(time.perf_counter() - started, 2)
    log.info("publish: merge verified, max |logit difference| %.3g <= %g (%s)", max_diff, publish_config.merge_tolerance,
             publish_config.merge_dtype)
    folder = output_dir / "model"
    model_ref = publish_config.repo_id if publish_config.target == "hf_hub" else str(folder.resolve())
    card_text = render_model_card(card, max_logit_diff=max_diff, tolerance=publish_config.merge_tolerance,
                                  merge_dtype=publish_config.merge_dtype, model_ref=model_ref)
    run_info = {"run_name": card.run_name, "base_model": card.base_model, "system_prompt": system_prompt,
                "gate": card.gate, "max_logit_diff": max_diff}
    saved_dtype, files = save_merged(merged, tokenizer, folder, model_dir=model_dir, adapter_dir=adapter_dir,
                                     card=card_text, run_info=run_info)
    timing["save"] = round(time.perf_counter() - started - timing["merge"], 2)
    log.info("publish: saved %d files (%s) to %s", len(files), saved_dtype, folder)
    gguf_facts = {}
    if publish_config.gguf is not None:
        gguf_facts = export_verified_gguf(folder, publish_config, verify_texts[: publish_config.verify_prompts], files, log,
                                          merged=merged, tokenizer=tokenizer, timing=timing)
        card_text = render_model_card(card, max_logit_diff=max_diff, tolerance=publish_config.merge_tolerance,
                                      merge_dtype=publish_config.merge_dtype, model_ref=model_ref, gguf={
                                          "file": Path(gguf_facts["gguf_file"]).name, "quantization": publish_config.gguf.quantization,
                                          "max_logit_diff": gguf_facts["gguf_max_logit_diff"]})
        rewrite_card_and_manifest(folder, card_text, files, saved_dtype)
    result = {"model_dir": str(folder), "files": files, **gguf_facts, "max_logit_diff": max_diff, "merge_dtype": publish_config.merge_dtype,
              "saved_dtype": saved_dtype, "target": publish_config.target}
    if publish_config.target == "hf_hub":
        assert_no_secret(folder, token)
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
        result |= push_folder(
            folder, files, repo_id=publish_config.repo_id, token=token, private=publish_config.private,
            branch=publish_config.branch, run_branch=f"loraflow-{card.run_name}-{digest}",
            message=f"loraflow: {card.run_name}", retries=publish_config.hub_retries,
            retry_delay=publish_config.hub_retry_delay, log=log,
        )
    log_best_effort(tracking, "publish", log, files=[folder / "README.md"], folder="publish")
    if publish_config.register_model:
        result |= register_in_mlflow(folder, files, card.run_name, tracking, {
            "prefect_flow_run_id": flow_run_id or "none", **({"hub_commit": result["hub_commit"]} if result.get("hub_commit") else {})}, log)
    return PublishResult(**result, timing=timing, seconds=round(time.perf_counter() - started, 2))


def register_in_mlflow(folder: Path, files: dict[str, str], name: str, tracking: TrackingRun | None, tags: dict, log) -> dict:
    """The merged folder as a version of registered model `name` under training's run (last: it is the one MLflow
    step that may fail the publish, and a retry finds the version again instead of adding one)."""
    from loraflow.publishing.merge import MODEL_MANIFEST, PublishError

    if tracking is None:
        raise PublishError("publish.register_model: training recorded no MLflow run (its tracker failed when training "
                           f"began, see the train log); the merged model is at {folder} -> retrain with the tracker up, "
                           "or set publish.register_model: false")
    weights = {path: digest for path, digest in files.items() if path not in ("README.md", MODEL_MANIFEST)}
    try:
        version = register_model(tracking, folder, name, files=weights, tags=tags)
    except Exception as error:
        raise PublishError(f"publish.register_model: MLflow at {tracking.tracking_uri} did not register {folder} "
                           f"({type(error).__name__}: {redact_url(str(error))[:300]}) -> start the server and re-run; "
                           "the re-run registers it once") from error
    log.info("publish: registered %s version %s in MLflow (run %s)", name, version, tracking.run_id)
    return {"registered_model": name, "registered_version": str(version)}


def export_verified_gguf(folder: Path, publish_config: PublishConfig, verify_texts: list[str], files: dict, log, *,
                         merged, tokenizer, timing: dict | None = None) -> dict:
    """Write the GGUF beside the merged weights (streamed), check its logits on `merged` (the merged model publish
    holds: no second load, loraflow.publishing.gguf_check), add it to `files`; returns its facts. `merged` holds
    the GGUF's weights afterwards. `timing` gets the seconds of gguf_export and gguf_check."""
    from loraflow.publishing.merge import PublishError, end_of_turn_ids, verification_batch
    from loraflow.runtime.artifact_store import file_sha256

    timing = {} if timing is None else timing
    started = time.perf_counter()
    path = export_gguf(folder, quantization=publish_config.gguf.quantization, eos_ids=end_of_turn_ids(tokenizer))
    timing["gguf_export"] = round(time.perf_counter() - started, 2)
    inputs = verification_batch(tokenizer, verify_texts, next(merged.parameters()).device)
    max_diff = gguf_logit_difference_in_place(merged, path, inputs)
    timing["gguf_check"] = round(time.perf_counter() - started - timing["gguf_export"], 2)
    if not max_diff <= publish_config.gguf.max_logit_difference:
        path.unlink()
        raise PublishError(f"{path.name}: max |logit difference| vs the merged model {max_diff:.4g} > publish.gguf.tolerance "
                           f"{publish_config.gguf.max_logit_difference:g}; the GGUF was removed and nothing was published")
    files[path.name] = file_sha256(path)
    log.info("publish: wrote %s, max |logit difference| vs merged %.3g", path.name, max_diff)
    return {"gguf_file": str(path), "gguf_max_logit_diff": max_diff}


def rewrite_card_and_manifest(folder: Path, card_text: str, files: dict, saved_dtype: str) -> None:
    """The card with the GGUF facts, then the manifest (last) listing the GGUF too; `files` updated in place."""
    from loraflow.runtime.atomic_files import write_json_atomic, write_text_atomic
    from loraflow.publishing.merge import MODEL_MANIFEST
    from loraflow.runtime.artifact_store import file_sha256

    write_text_atomic(folder / "README.md", card_text)
    files["README.md"] = file_sha256(folder / "README.md")
    listed = {name: digest for name, digest in files.items() if name != MODEL_MANIFEST}
    write_json_atomic(folder / MODEL_MANIFEST, {"files": listed, "saved_dtype": saved_dtype})
    files[MODEL_MANIFEST] = file_sha256(folder / MODEL_MANIFEST)


# ---- Prefect wrapper -----------------------------------------------------------------------------------

try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect
    task = None

if task is not None:

    @task(name="publish")  # no cache: publishing is a side effect that must happen when asked
    def publish_task(
        model_dir: str, adapter_dir: str, publish_config: PublishConfig, output_dir: str, card: CardFacts,
        verify_texts: list[str], system_prompt: str | None = None, trust_remote_code: bool = False,
        tracking: TrackingRun | None = None, store_root: str = "", adapter_fingerprint: str = "",
    ) -> PublishResult:
        """Prefect task around `publish_model` (the token is resolved inside, never a parameter); a registry
        version is tagged with this flow run's id. With a URL `store_root` the model folder is shipped to the store
        for other hosts; `adapter_fingerprint` only feeds the cache key (the flow keys on it, not on folder paths)."""
        from prefect import get_run_logger
        from prefect.runtime import flow_run

        result = publish_model(model_dir, adapter_dir, publish_config, output_dir, card=card, verify_texts=verify_texts,
                               system_prompt=system_prompt, trust_remote_code=trust_remote_code, tracking=tracking,
                               flow_run_id=flow_run.get_id(), log=get_run_logger())
        ship_folder(store_root, output_dir)  # nothing for a local store (or none given)
        return result
