"""train: a LoRA / QLoRA adapter on the train split of a TOKENS artifact.

Supported: peft LoRA (rsLoRA, DoRA) on every linear layer or a named list; base weights in 4-bit
(bitsandbytes NF4, double quant, bf16 compute and storage), 8-bit or 16-bit; gradient checkpointing;
paged 8-bit AdamW on GPU, AdamW on CPU; bf16 where the device computes it fast, else fp32 (never fp16;
loraflow.modeling.precision); resumable
checkpoints; a stop on non-finite loss or gradient norm.
Packing (train.packing) uses loraflow.training's first-fit packer and PackedCollator with per-document
causal masks. Several GPUs (train.distributed = ddp | fsdp): train_adapter hands over to
loraflow.training.launch, which runs `train_launched` in train.num_processes processes with `accelerate launch`
and returns rank 0's TrainResult; in those processes only rank 0 writes the adapter, metrics, loss curve and
checkpoint markers (docs/scaling.md). FSDP runs without the fast path's model surgery (below). One process trains
in `train_here`, which decides the TrainPlan (loraflow.training.plan) once, logs it and returns it in TrainResult.plan.

The fast path (default on CUDA: train.packing="auto"): examples packed into rows of train.pack_max_tokens,
`configure_model_for_speed` after get_peft_model instead of prepare_model_for_kbit_training (varlen flash
attention with each packed document its own sequence, else flex attention with per-document block masks;
Liger kernels, fused LoRA epilogues, bf16 frozen tensors, gradient checkpointing on only as many layers as
train.memory_budget_gb needs), packed rows per micro-batch chosen from the same budget, Trainer's own checkpointing off, no 2-D attention_mask. The SpeedPlan (what was applied, and why each
lever that was not) goes into the TrainPlan and metrics.json with tokens/s (non-padding tokens) and peak memory; docs/speed.md
has the measurements behind it.

Without CUDA the same code path runs with an unquantized base (bitsandbytes' 4-bit path needs a GPU to be
worth it), and the log says so.

Where each step lives: loraflow.runtime.tokens_input (the TOKENS read); in loraflow.training: .plan (device, precision,
quantization, packing, the fast path, processes), .data (inputs, batches; the fast path's micro-batch in .micro_batch),
.model_loading, .trainer (Trainer and its callbacks),
.checkpoints (identity, resume, the saved adapter), .outputs (curve, metrics), .distributed, .launch (several
processes). This module is the recipe and the Prefect task.

Output folder:
    adapter/                      adapter_model.safetensors + adapter_config.json + loraflow-adapter.json (last)
    checkpoints/checkpoint-N/     Trainer checkpoints; loraflow-complete.json written last marks a whole one
    metrics.json, loss_curve.parquet, loss_curve.png
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from loraflow.config.train import TrainConfig
from loraflow.tracking.mlflow_run import check_tracker, log_best_effort, tracked_run
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.throttle import Throttle
from loraflow.runtime.store_folders import ship_folder
from loraflow.training.checkpoints import finished_result, resume_point
from loraflow.training.continuation import StartAdapter
from loraflow.training.data import TrainInputs, plan_batches, read_train_inputs
from loraflow.training.distributed import is_main_process, world_size
from loraflow.training.launch import launch_training, resolve_num_processes
from loraflow.training.model_loading import load_lora_model, load_tokenizer, parameter_counts
from loraflow.training.outputs import gather_after_training, peak_memory, save_outputs
from loraflow.training.plan import check_fsdp_budget, plan_training
from loraflow.training.result import TrainResult
from loraflow.training.trainer import build_trainer, train_resuming

log_default = logging.getLogger("loraflow.train")
PROGRESS_SECONDS = 5.0  # the UI's progress bar moves at most this often: each update is an API call and an event


def train_adapter(tokens: ArtifactRef | pd.DataFrame, model_dir: str | Path, train_config: TrainConfig,
                  output_dir: str | Path, *, store: ArtifactStore | None = None, trust_remote_code: bool = False,
                  callbacks: list | None = None, on_step=None, run_name: str | None = None,
                  tracking_params: dict[str, str] | None = None, start: StartAdapter | None = None,
                  log: logging.Logger | logging.LoggerAdapter | None = None) -> TrainResult:
    """Train a LoRA adapter on the `split == "train"` rows of a TOKENS artifact (a ref or its DataFrame): here
    (`train_here`), or with train.distributed in launched processes (each runs `train_launched`).

    Re-running after a crash continues from the newest complete checkpoint in `output_dir`; it refuses
    (ResumeMismatchError, listing what differs) when the data, base model or config changed, unless
    `train_config.allow_resume_mismatch`. A finished adapter for the same inputs is returned as is.
    `callbacks` are extra transformers TrainerCallbacks (tests use one to simulate a crash); they run in this
    process, so train.distributed (several processes) refuses them. `on_step(step, max_steps, loss)` is called
    after each optimizer step, here or from rank 0's report (the Prefect progress artifact).
    With mlflow in train.report_to: an MLflow server that does not answer fails here before anything loads
    (TrackerError); the run transformers' MLflowCallback opens is named `run_name`, gets `tracking_params` (the
    flattened pipeline config) and the curve files, and is TrainResult.tracking (loraflow.tracking.mlflow_run).
    `start` (train.init_from=champion, found by the flow): continue from that adapter on the rows changed since its
    data plus a replayed share (loraflow.training.continuation); TrainResult.continuation says what ran.
    """
    log = log or log_default
    started = time.perf_counter()
    launching = train_config.distributed != "none"
    if launching and callbacks:
        raise ValueError("train.distributed runs training in launched processes, where callbacks from this "
                         "process cannot run: drop callbacks, or set train.distributed=none")
    # ---- validate inputs before loading anything heavy; reuse a finished adapter ----
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    inputs = read_train_inputs(tokens, store, model_dir, train_config, start)
    done = finished_result(output_dir, inputs.fingerprint)
    if done is not None:
        log.info("train: adapter %s already complete for these inputs (fingerprint %s); reusing it", output_dir / "adapter", inputs.fingerprint)
        return done
    check_tracker(train_config)
    if not launching:
        return train_here(inputs, model_dir, train_config, output_dir, trust_remote_code=trust_remote_code,
                          callbacks=callbacks, on_step=on_step, run_name=run_name, tracking_params=tracking_params,
                          log=log, started=started)
    if train_config.distributed == "fsdp":  # per-GPU peak stated (and a budget it breaks refused) before launching
        import torch

        check_fsdp_budget(model_dir, train_config, inputs.longest_example,
                          resolve_num_processes(train_config, torch.cuda.device_count()), log)
    # Each launched process runs train_launched; rank 0's result comes back.
    result = launch_training(tokens, model_dir, train_config, output_dir, store=store, trust_remote_code=trust_remote_code,
                             log=log, on_step=on_step, train_fn=train_launched)
    log_training_files(result, tracking_params, log)
    return result


def train_launched(tokens: ArtifactRef | pd.DataFrame, model_dir: str | Path, train_config: TrainConfig,
                   output_dir: str | Path, *, store: ArtifactStore | None = None, trust_remote_code: bool = False,
                   on_step=None) -> TrainResult:
    """One launched process's share of a train.distributed run (what loraflow.training.launch's job file names);
    only rank 0 writes the outputs, and its TrainResult is the run's."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    inputs = read_train_inputs(tokens, store, model_dir, train_config)
    return train_here(inputs, model_dir, train_config, Path(output_dir), trust_remote_code=trust_remote_code,
                      on_step=on_step, log=log_default, started=started)


def train_here(inputs: TrainInputs, model_dir: Path, train_config: TrainConfig, output_dir: Path, *,
               trust_remote_code: bool = False, callbacks: list | None = None, on_step=None, run_name: str | None = None,
               tracking_params: dict[str, str] | None = None, log=log_default, started: float | None = None) -> TrainResult:
    """Train in this process (alone, or as one of the launched processes): plan, model, batches, Trainer, train,
    save. The TrainPlan is decided once here and goes into the TrainResult."""
    started = started or time.perf_counter()
    plan = plan_training(train_config, model_dir, inputs.longest_example, log, processes=world_size())
    if inputs.continuation is not None:
        log.info("train: %s", inputs.continuation.describe())

    # ---- resume or start: decide before building the Trainer, so a refusal costs nothing ----
    checkpoints_dir = output_dir / "checkpoints"
    resume_from, resumed_from_step = resume_point(checkpoints_dir, inputs.identity, train_config, log)

    # ---- model: base (quantized on GPU) + LoRA. The collator needs the pad id, so the tokenizer comes first ----
    _, pad_id = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    # Seeded before the adapter exists: LoRA's A matrices are drawn from the global RNG, and a resumed run
    # must rebuild the same model the checkpoint was made from.
    from transformers import set_seed

    set_seed(train_config.seed)
    start_dir = inputs.continuation.start.adapter_dir if inputs.continuation else None
    model = load_lora_model(model_dir, train_config, plan, trust_remote_code=trust_remote_code, start_adapter_dir=start_dir)
    trainable, total = parameter_counts(model)
    log.info("train: %s trainable LoRA parameters of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # ---- data: padded batches, or packed rows whose documents only attend to themselves (the plan's micro-batch) ----
    batches = plan_batches(model, inputs.train_rows, train_config, plan, pad_id, log=log)
    plan = batches.plan

    # ---- trainer, then train (from the checkpoint chosen above) ----
    trainer, recorder = build_trainer(model, batches, train_config, checkpoints_dir, identity=inputs.identity,
                                      on_step=on_step, callbacks=callbacks, log=log, run_name=run_name,
                                      tracking_params=tracking_params, resume_from=resume_from)
    train_output = train_resuming(trainer, resume_from, checkpoints_dir, log, config=train_config)
    recorder.close()

    # ---- save: collectives on every process first (token counts, the FSDP gather), then rank 0 writes ----
    gathered = gather_after_training(trainer, batches.collator, output_dir)
    peak_bytes, peak_kind = peak_memory(plan.device)
    result = TrainResult(
        adapter_dir=str(output_dir / "adapter"), metrics_path=str(output_dir / "metrics.json"),
        loss_curve_path=str(output_dir / "loss_curve.parquet"), loss_plot_path=str(output_dir / "loss_curve.png"),
        global_step=trainer.state.global_step, resumed_from_step=resumed_from_step, train_rows=inputs.train_rows.num_rows,
        train_tokens=inputs.train_tokens, final_loss=recorder.final_loss(),
        tokens_per_second=recorder.tokens_per_second(),
        tokens_per_second_after_first_step=recorder.tokens_per_second(after_first_step=True),
        first_step_seconds=round(recorder.first_step_at - started, 2) if recorder.first_step_at else None,
        peak_memory_bytes=peak_bytes, peak_memory_kind=peak_kind, packing=plan.packing,
        rows_per_micro_batch=plan.rows_per_micro_batch, speed_plan=plan.speed,
        seconds=round(time.perf_counter() - started, 2), device=plan.device, device_name=plan.device_name,
        quantization=plan.quantization, quantization_reason=plan.quantization_reason,
        precision=plan.precision, precision_reason=plan.precision_reason, optimizer=plan.optimizer,
        data_sha256=inputs.data_sha, fingerprint=inputs.fingerprint, tracking=tracked_run(trainer),
        fsdp_memory=plan.fsdp_memory, plan=plan, continuation=inputs.continuation,
    )
    if is_main_process():  # rank 0 writes; the others' result is never read
        save_outputs(result, model=model, trainer=trainer, train_output=train_output, curve_rows=recorder.rows,
                     batches=batches, gathered=gathered, config=train_config, identity=inputs.identity,
                     parameters=(trainable, total), log=log)
        if plan.launcher is None:  # launched: the caller logs rank 0's files (train_adapter)
            log_training_files(result, None, log)  # the params went in when training began
    return result


def log_training_files(result: TrainResult, params: dict[str, str] | None, log) -> None:
    """The curve (PNG, Parquet) and metrics.json, and `params` when given, to the run under train/ (best effort)."""
    files = [result.loss_plot_path, result.loss_curve_path, result.metrics_path]
    log_best_effort(result.tracking, "train", log, params=params, files=files, folder="train")


# ---- Prefect wrapper -----------------------------------------------------------------------------------

try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect: the plain function above is what runs there
    task = None

if task is not None:

    @task(name="train")  # cached and locked by the flow (loraflow.runtime.stage_task.run_locked)
    def train_task(
        tokens: ArtifactRef, model_dir: str, train_config: TrainConfig, output_dir: str, store_root: str,
        base_fingerprint: str = "", trust_remote_code: bool = False, run_name: str | None = None,
        tracking_params: dict[str, str] | None = None, start: StartAdapter | None = None,
    ) -> TrainResult:
        """Prefect task around `train_adapter` (base_fingerprint only feeds the cache key; `start`, the champion
        adapter a train.init_from=champion run continues from, is in it with its content hash; run_name and
        tracking_params, for the tracker, are left out of it by the flow); a progress artifact in the UI follows
        the optimizer steps, updated at most every PROGRESS_SECONDS (not every step: each update is an API call and
        a `prefect.artifact.updated` event). With train.distributed the launched processes' output
        streams into this task's log, and rank 0's result is this task's result."""
        from prefect import get_run_logger
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        log = get_run_logger()
        progress_id = create_progress_artifact(progress=0.0, key="training-progress", description="training steps done (%)")
        unreported: list[int] = []
        throttle = Throttle(PROGRESS_SECONDS)

        def report_progress(step: int, max_steps: int, loss: float | None) -> None:
            # The UI's progress bar is not worth a training run: while the server or its database is away
            # (a restart), steps go on unreported and one warning says so.
            if not max_steps or not throttle.ready(force=step >= max_steps):
                return
            try:
                update_progress_artifact(progress_id, progress=round(100.0 * step / max_steps, 1))
            except Exception as error:  # any failure of the API call; training itself is unaffected
                if not unreported:
                    log.warning(f"train: progress not reported to the Prefect server from step {step} ({error}); "
                                "training continues")
                unreported.append(step)
            else:
                if unreported:
                    log.info(f"train: progress reported again from step {step} ({len(unreported)} steps unreported)")
                    unreported.clear()

        result = train_adapter(
            tokens, model_dir, train_config, output_dir, store=ArtifactStore(store_root),
            trust_remote_code=trust_remote_code, log=log, on_step=report_progress, run_name=run_name,
            tracking_params=tracking_params, start=start,
        )
        report_progress(1, 1, None)  # 100 %, as best-effort as every step's report
        ship_folder(store_root, output_dir)  # a URL store: other hosts reuse this adapter (before the lock is released)
        return result
