"""train: a LoRA / QLoRA adapter on the train split of a TOKENS artifact.

Supported: peft LoRA (rsLoRA, DoRA) on every linear layer or a named list; base weights in 4-bit
(bitsandbytes NF4, double quant, bf16 compute and storage), 8-bit or 16-bit; gradient checkpointing;
paged 8-bit AdamW on GPU, AdamW on CPU; bf16 where the device computes it fast, else fp32 (never fp16;
loraflow.precision); resumable
checkpoints; a stop on non-finite loss or gradient norm.
Packing (train.packing) uses loraflow.training's first-fit packer and PackedCollator with per-document
causal masks. Several GPUs (train.distributed = ddp | fsdp): train_adapter hands over to
loraflow.training.launch, which runs this same function in train.num_processes processes with `accelerate launch`
and returns rank 0's TrainResult; in those processes only rank 0 writes the adapter, metrics, loss curve and
checkpoint markers (docs/scaling.md). FSDP runs without the fast path's model surgery (below).

The fast path (default on CUDA: train.packing="auto"): examples packed into rows of train.pack_max_tokens,
`configure_model_for_speed` after get_peft_model instead of prepare_model_for_kbit_training (flex attention
with per-document block masks, Liger kernels, fused LoRA epilogues, bf16 frozen tensors, gradient checkpointing
on only as many layers as train.memory_budget_gb needs), packed rows per micro-batch chosen from the same
budget, Trainer's own checkpointing off, no 2-D attention_mask. The SpeedPlan (what was applied, and why each
lever that was not) goes into metrics.json with tokens/s (non-padding tokens) and peak memory; docs/speed.md
has the measurements behind it.

Without CUDA the same code path runs with an unquantized base (bitsandbytes' 4-bit path needs a GPU to be
worth it), and the log says so.

Output folder:
    adapter/                      adapter_model.safetensors + adapter_config.json + loraflow-adapter.json (last)
    checkpoints/checkpoint-N/     Trainer checkpoints; loraflow-complete.json written last marks a whole one
    metrics.json, loss_curve.parquet, loss_curve.png
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from loraflow.config.train import TrainConfig
from loraflow.store import DISK_FULL_ERRNOS, ArtifactRef, ArtifactStore, disk_full, file_sha256, table_bytes

ADAPTER_MANIFEST = "loraflow-adapter.json"
CHECKPOINT_MARKER = "loraflow-complete.json"
# Settings that may change between a crash and its re-run without changing what is trained.
RESUME_NEUTRAL_SETTINGS = ("allow_resume_mismatch", "checkpoint_every", "keep_checkpoints", "nonfinite_patience", "cpu_threads")

# = data_contracts.tokens.IGNORE_INDEX; not imported so the GPU machine needs no pandera.
IGNORE_INDEX = -100
# = loraflow.training.launch.LAUNCHED_ENV (set in launched processes), kept here so this module imports no torch.
LAUNCHED_ENV = "LORAFLOW_TRAIN_LAUNCHED"
log_default = logging.getLogger("loraflow.train")


class NonFiniteTrainingError(RuntimeError):
    """Loss or gradient norm stayed NaN/inf for `train.nonfinite_patience` consecutive steps."""


class ResumeMismatchError(RuntimeError):
    """A checkpoint was made from other data or another config; the message lists the differences."""


class TrainResult(BaseModel):
    """What training produced, small and JSON-serialisable (what the flow passes to evaluate and publish)."""

    adapter_dir: str = Field(..., description="Folder with adapter_model.safetensors and adapter_config.json.")
    metrics_path: str = Field(..., description="metrics.json of the run.")
    loss_curve_path: str = Field(..., description="Per-step loss curve (Parquet).")
    loss_plot_path: str | None = Field(None, description="Loss curve plot (PNG).")
    global_step: int
    resumed_from_step: int | None = Field(None, description="Checkpoint step the run continued from, if any.")
    reused: bool = Field(False, description="A complete adapter for the same data and config already existed.")
    train_rows: int
    train_tokens: int = Field(..., description="Real (non-padding) tokens in the train split.")
    final_loss: float | None
    tokens_per_second: float | None
    peak_memory_bytes: int
    peak_memory_kind: str = Field(..., description="cuda_max_allocated or process_max_rss.")
    tokens_per_second_after_first_step: float | None = Field(
        None, description="Non-padding tokens/s from the end of the first step to the last (leaves out compilation/warm-up).",
    )
    packing: bool = Field(False, description="Whether examples were packed into rows.")
    rows_per_micro_batch: int | None = Field(None, description="Packed rows (or examples) per forward pass.")
    speed_plan: dict | None = Field(
        None, description="loraflow.training SpeedPlan of the fast path (what was applied, and why not the rest); None off it.",
    )
    seconds: float
    device: str
    quantization: str = Field(..., description="Quantization actually used (none on CPU).")
    precision: str
    precision_reason: str | None = Field(None, description="Why this precision (loraflow.precision: CPU bf16 support, benchmark).")
    optimizer: str
    data_sha256: str
    fingerprint: str = Field(..., description="Hash of data + base model + training config: the adapter's identity.")


# ---- public entry point --------------------------------------------------------------------------------

def train_adapter(
    tokens: ArtifactRef | pd.DataFrame,
    model_dir: str | Path,
    train_config: TrainConfig,
    output_dir: str | Path,
    *,
    store: ArtifactStore | None = None,
    trust_remote_code: bool = False,
    callbacks: list | None = None,
    on_step=None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the `split == "train"` rows of a TOKENS artifact (a ref or its DataFrame).

    Re-running after a crash continues from the newest complete checkpoint in `output_dir`; it refuses
    (ResumeMismatchError, listing what differs) when the data, base model or config changed, unless
    `train_config.allow_resume_mismatch`. A finished adapter for the same inputs is returned as is.
    `callbacks` are extra transformers TrainerCallbacks (tests use one to simulate a crash); they run in this
    process, so train.distributed (several processes) refuses them. `on_step(step, max_steps, loss)` is called
    after each optimizer step, here or from rank 0's report (the Prefect progress artifact).
    """
    log = log or log_default
    started = time.perf_counter()
    launching = train_config.distributed != "none" and not os.environ.get(LAUNCHED_ENV)
    if launching and callbacks:
        raise ValueError("train.distributed runs training in launched processes, where callbacks from this "
                         "process cannot run: drop callbacks, or set train.distributed=none")
    main_process = int(os.environ.get("RANK", 0)) == 0  # rank 0 of a launch, or the only process
    # ---- validate inputs before loading anything heavy ----
    frame, data_sha = _load_tokens(tokens, store)
    train_rows = frame[frame["split"] == "train"]
    if train_rows.empty:
        raise ValueError(f"tokens artifact {data_sha[:12]}…: no rows with split='train'; nothing to train on")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    identity = run_identity(data_sha, model_dir, train_config)
    fingerprint = _hash(identity)
    adapter_dir = output_dir / "adapter"
    done = _finished_result(output_dir, fingerprint)
    if done is not None:
        log.info("train: adapter %s already complete for these inputs (fingerprint %s); reusing it", adapter_dir, fingerprint)
        return done
    if launching:
        from loraflow.training.launch import launch_training

        return launch_training(tokens, model_dir, train_config, output_dir, store=store,
                               trust_remote_code=trust_remote_code, log=log, on_step=on_step)

    import torch

    env = training_environment(train_config)
    if env["device"] == "cpu" and train_config.cpu_threads:
        torch.set_num_threads(train_config.cpu_threads)
    if train_config.quantization != "none" and env["quantization"] == "none":
        log.warning(
            "train: no CUDA device, so train.quantization=%s runs unquantized (16-bit base) on CPU; "
            "the code path is otherwise the same", train_config.quantization,
        )
    log.info("train: device=%s precision=%s (%s) quantization=%s optimizer=%s", env["device"], env["precision"],
             env["precision_reason"], env["quantization"], env["optimizer"])

    # ---- resume or start: decide before building the Trainer, so a refusal costs nothing ----
    checkpoints_dir = output_dir / "checkpoints"
    resume_from = latest_complete_checkpoint(checkpoints_dir, log)
    resumed_from_step = None  # read now: Trainer rotates old checkpoints away while it trains
    if resume_from is not None:
        marker = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
        resumed_from_step = marker["step"]
        differences = identity_differences(marker["identity"], identity)
        if differences and not train_config.allow_resume_mismatch:
            raise ResumeMismatchError(
                f"{resume_from} was written for other inputs; refusing to resume:\n  " + "\n  ".join(differences)
                + f"\nDelete {checkpoints_dir} to start over, or set train.allow_resume_mismatch=true to continue anyway."
            )
        if differences:
            log.warning("train: resuming from %s despite differences: %s", resume_from, "; ".join(differences))
        log.info("train: resuming from %s (step %s)", resume_from, marker["step"])

    # ---- model: base (quantized on GPU) + LoRA ----
    # The collator needs the pad id, so the tokenizer comes first.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packing = packing_enabled(train_config, env)
    fast = fast_path_enabled(packing, env, train_config.distributed)
    # Seeded before the adapter exists: LoRA's A matrices are drawn from the global RNG, and a resumed run
    # must rebuild the same model the checkpoint was made from.
    from transformers import set_seed

    set_seed(train_config.seed)
    if fast:
        check_budget_before_loading(model_dir, train_config, env, int(train_rows["length"].max()))
    model = load_lora_model(model_dir, train_config, env, trust_remote_code=trust_remote_code, fast=fast)
    trainable, total = _parameter_counts(model)
    log.info("train: %s trainable LoRA parameters of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # ---- data: padded batches, or packed rows whose documents only attend to themselves ----
    examples = TokenizedExamples(train_rows)
    rows_per_micro_batch, plan, pack_stats = train_config.micro_batch_size, None, None
    if packing:
        from loraflow.training import PackedCollator, enable_document_masking, pack_examples, packing_stats

        max_tokens = max(train_config.pack_max_tokens, int(train_rows["length"].max()))
        examples = pack_examples(examples.items, max_tokens=max_tokens)
        pack_stats = packing_stats(examples, max_tokens)
        log.info("train: packing %s", pack_stats)
        if fast:
            rows_per_micro_batch, plan = configure_fast_path(model, train_config, env, max_tokens, len(examples), log)
        else:
            rows_per_micro_batch = train_config.pack_rows_per_micro_batch or train_config.micro_batch_size
            # The mask hook must see position_ids without an attention_mask: PackedCollator sends exactly that.
            enable_document_masking(model)
        # No 2-D attention_mask in these batches: transformers would then treat a row as one document.
        collator = PackedCollator(pad_token_id=pad_id, pad_to_multiple_of=128 if env["device"] == "cuda" else None)
    else:
        collator = PadByPosition(pad_id, pad_to_multiple_of=8 if env["device"] == "cuda" else None)

    # ---- trainer ----
    from transformers import PrinterCallback, ProgressCallback

    Trainer = resumable_trainer_class()
    recorder = StepRecorder(collator, log if main_process else None)
    guard = NonFiniteGuard(train_config.nonfinite_patience)
    marker_writer = CheckpointMarker(identity, main_process)
    trainer = Trainer(
        model=model,
        args=training_arguments(train_config, env, checkpoints_dir, rows_per_micro_batch=rows_per_micro_batch,
                                fast=fast, packing=packing),
        train_dataset=examples,
        data_collator=collator,
        callbacks=[recorder, guard, marker_writer, *([StepReport(on_step)] if on_step else []), *(callbacks or [])],
    )
    for default_printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default_printer)
    if train_config.distributed == "fsdp" and not trainer.is_fsdp_enabled:
        raise RuntimeError(f"train.distributed=fsdp but accelerate set up {trainer.accelerator.distributed_type.value}: "
                           "launch through train_adapter (accelerate launch with loraflow's FSDP config) on CUDA GPUs")
    if env["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()

    try:
        train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except OSError as error:  # out of space while saving a checkpoint: say so, and what a re-run resumes from
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        kept = latest_complete_checkpoint(checkpoints_dir, log)  # also removes the partial one, freeing its space
        raise disk_full(error, error.filename or str(checkpoints_dir), "a checkpoint in",
                        f"{kept.name} is intact and a re-run resumes from it" if kept else "No checkpoint was complete yet") from error
    recorder.close()

    # ---- save: adapter (manifest last), curve, metrics; then drop the checkpoints ----
    # Collectives first, on every process: token counts are summed over processes, and under FSDP the adapter
    # is gathered whole (each process holds a shard of it).
    tokens_seen = sum_over_processes(collator.tokens_seen)
    trained_tokens_seen = getattr(collator, "trained_tokens_seen", None)
    if trained_tokens_seen is not None:
        trained_tokens_seen = sum_over_processes(trained_tokens_seen)
    fsdp_saved = None
    if trainer.is_fsdp_enabled:
        # peft's FSDP-QLoRA recipe: switch to a full state dict and let Trainer gather and save the adapter (every
        # process takes part; rank 0 writes). Known broken (H200, 1 process, transformers 5.17, 2026-12-01): training
        # runs and its loss falls, but this save, like accelerator.get_state_dict before it, yields an adapter with
        # no LoRA tensors, which save_adapter refuses (docs/scaling.md).
        fsdp_saved = output_dir / ".adapter-fsdp"
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(fsdp_saved))
    peak_bytes, peak_kind = peak_memory(env["device"])
    curve = pd.DataFrame(recorder.rows)
    final_loss = next((r["loss"] for r in reversed(recorder.rows) if r.get("loss") is not None), None)
    result = TrainResult(
        adapter_dir=str(adapter_dir),
        metrics_path=str(output_dir / "metrics.json"),
        loss_curve_path=str(output_dir / "loss_curve.parquet"),
        loss_plot_path=str(output_dir / "loss_curve.png"),
        global_step=trainer.state.global_step,
        resumed_from_step=resumed_from_step,
        train_rows=len(train_rows),
        train_tokens=int(train_rows["length"].sum()),
        final_loss=final_loss,
        tokens_per_second=recorder.tokens_per_second(),
        tokens_per_second_after_first_step=recorder.tokens_per_second(after_first_step=True),
        peak_memory_bytes=peak_bytes,
        peak_memory_kind=peak_kind,
        packing=packing,
        rows_per_micro_batch=rows_per_micro_batch,
        speed_plan=plan,
        seconds=round(time.perf_counter() - started, 2),
        device=env["device"],
        quantization=env["quantization"],
        precision=env["precision"],
        precision_reason=env["precision_reason"],
        optimizer=env["optimizer"],
        data_sha256=data_sha,
        fingerprint=fingerprint,
    )
    if not main_process:  # rank 0 writes; the others' result is never read
        return result
    output_dir.mkdir(parents=True, exist_ok=True)
    curve.to_parquet(result.loss_curve_path, index=False)
    result.loss_plot_path = plot_loss_curve(curve, output_dir / "loss_curve.png")
    metrics = {
        **result.model_dump(),
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "trainable_parameters": trainable,
        "packing_stats": pack_stats,
        "tokens_seen": tokens_seen,
        "trained_tokens_seen": trained_tokens_seen,
        # What actually ran: accelerate's distributed type (NO, MULTI_CPU, MULTI_GPU, FSDP) and the process count.
        "distributed": {"strategy": train_config.distributed, "processes": world_size(),
                        "accelerate_distributed_type": trainer.accelerator.distributed_type.value},
        "total_parameters": total,
        "train_config": train_config.model_dump(mode="json"),
        "identity": identity,
        "library_versions": library_versions(),
    }
    _write_json_atomic(Path(result.metrics_path), metrics)
    save_adapter(model, adapter_dir, manifest={"fingerprint": fingerprint, "identity": identity, "result": result.model_dump()},
                 saved_by_trainer=fsdp_saved)
    shutil.rmtree(checkpoints_dir, ignore_errors=True)
    log.info(
        "train: done in %.0f s, %d steps, final loss %s, %s tokens/s (%s after the first step), peak memory %.2f GB (%s); "
        "adapter at %s",
        result.seconds, result.global_step, f"{final_loss:.4f}" if final_loss is not None else "n/a",
        f"{result.tokens_per_second:,.0f}" if result.tokens_per_second else "n/a",
        f"{result.tokens_per_second_after_first_step:,.0f}" if result.tokens_per_second_after_first_step else "n/a",
        peak_bytes / 1e9, peak_kind, adapter_dir,
    )
    return result


# ---- environment and model -----------------------------------------------------------------------------

def training_environment(config: TrainConfig) -> dict:
    """Device, precision, quantization and optimizer this machine will actually use for `config`."""
    import torch

    from loraflow.precision import choose_precision

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    try:
        choice = choose_precision(config.precision, device)
    except ValueError as error:
        raise ValueError(f"train.precision: {error}") from None
    quantization = config.quantization if cuda else "none"
    # Under FSDP paged 8-bit AdamW fails when a checkpoint is saved (peft's FSDP-QLoRA caveats).
    paged = cuda and config.distributed != "fsdp"
    optimizer = config.optimizer if config.optimizer != "auto" else ("paged_adamw_8bit" if paged else "adamw_torch")
    return {"device": device, "precision": choice.precision, "precision_reason": choice.reason,
            "quantization": quantization, "optimizer": optimizer}


def packing_enabled(config: TrainConfig, env: dict) -> bool:
    """train.packing resolved for this machine: "auto" packs on CUDA (the fast path) and not on CPU."""
    if config.packing == "auto":
        return env["device"] == "cuda"
    return bool(config.packing)


def fast_path_enabled(packing: bool, env: dict, distributed: str = "none") -> bool:
    """The packed fast path (configure_model_for_speed) runs on CUDA; packing on CPU keeps the CPU settings.
    Not under FSDP: its fused LoRA epilogues and per-layer checkpointing reach into modules FSDP has flattened
    and wrapped (measured nowhere yet), so FSDP packs with document masks and Trainer's checkpointing."""
    return packing and env["device"] == "cuda" and distributed != "fsdp"


def configure_fast_path(model, config: TrainConfig, env: dict, max_tokens: int, packed_rows: int, log) -> tuple[int, dict]:
    """Rows per micro-batch from the memory budget, then `configure_model_for_speed`; returns (rows, plan dict)."""
    import torch

    from loraflow.training import configure_model_for_speed

    budget = config.memory_budget_gb
    if budget is None:
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
    rows, reason = choose_rows_per_micro_batch(model, config, max_tokens, packed_rows, budget)
    plan = configure_model_for_speed(
        model, config, memory_budget_gb=budget, tokens_per_micro_batch=rows * max_tokens,
        compute_dtype=torch.bfloat16 if env["precision"] == "bf16" else torch.float32,
    ).as_dict()
    plan.update(rows_per_micro_batch=rows, rows_choice=reason, row_tokens=max_tokens)
    log.info("train: fast path, %d packed rows of %d tokens per micro-batch (%s); speed plan %s", rows, max_tokens, reason, plan)
    return rows, plan


def check_budget_before_loading(model_dir: Path, config: TrainConfig, env: dict, longest_example: int) -> None:
    """Refuse (MemoryBudgetError, naming the smallest budget that works) a train.memory_budget_gb that even one
    packed row with every layer checkpointed cannot keep: read from config.json, before any weights load."""
    import importlib.util

    from loraflow.training.speed import check_memory_budget

    config_file = model_dir / "config.json"
    if config.memory_budget_gb is None or not config_file.exists():
        return
    try:
        check_memory_budget(
            json.loads(config_file.read_text()), max(config.pack_max_tokens, longest_example), config.memory_budget_gb,
            lora_r=config.lora_r, target_modules=config.target_modules, quantization=env["quantization"],
            fused_head=importlib.util.find_spec("liger_kernel") is not None,
        )
    except (AttributeError, KeyError, TypeError):  # not a Llama-style config: the plan after loading decides alone
        return


def choose_rows_per_micro_batch(model, config: TrainConfig, max_tokens: int, packed_rows: int, budget_gb: float) -> tuple[int, str]:
    """Packed rows per forward pass, and why: train.pack_rows_per_micro_batch, else the most of 8/4/2/1 rows whose
    activations fit `budget_gb` (GiB) with no layer checkpointed (loraflow.training.plan_checkpointing's memory
    model; 8B at 4,096 tokens per row peaked at 40 GB with 2 rows and 75 GB with 4 on an H100: docs/speed.md), else 2 rows
    with the planner checkpointing layers, else 1. Never more rows than the data has."""
    from loraflow.training import plan_checkpointing

    if config.pack_rows_per_micro_batch:
        return config.pack_rows_per_micro_batch, "train.pack_rows_per_micro_batch"
    fused_head = _liger_available_for(model)
    most = max(1, packed_rows)
    for rows in (8, 4, 2, 1):
        if rows > most and rows != 1:
            continue
        checkpointed, estimate = plan_checkpointing(model, rows * max_tokens, budget_gb, fused_head=fused_head)
        if checkpointed == 0:
            return rows, (f"most rows (of 8/4/2/1, at most the {packed_rows} packed) that fit {budget_gb:.1f} GiB "
                          f"with no layer checkpointed: estimated peak {estimate:.1f} GiB")
    if not config.gradient_checkpointing:
        return 1, f"no row count fits {budget_gb:.1f} GiB whole and train.gradient_checkpointing is off: 1 row"
    rows = min(2, most)
    layers, estimate = plan_checkpointing(model, rows * max_tokens, budget_gb, fused_head=fused_head)
    if estimate <= budget_gb or rows == 1:
        return rows, (f"no row count fits {budget_gb:.1f} GiB whole: {rows} rows with {layers} layers checkpointed "
                      f"(estimated peak {estimate:.1f} GiB)")
    # The estimate above keeps a 3 GiB reserve; the measured peaks of every-layer-checkpointed plans stayed within
    # minimum_budget_gb (docs/speed.md, the frontier): 2 rows all checkpointed beat 1 row where that minimum fits.
    from loraflow.training.speed import minimum_budget_gb

    needed = minimum_budget_gb(model.config, rows * max_tokens, lora_r=config.lora_r, target_modules=config.target_modules,
                               quantization=config.quantization, fused_head=fused_head)
    if needed <= budget_gb:
        return rows, (f"no row count fits {budget_gb:.1f} GiB whole: {rows} rows with every layer checkpointed "
                      f"(calibrated minimum {needed:.1f} GiB; the plan's estimate with its reserve {estimate:.1f} GiB)")
    return 1, f"2 rows exceed {budget_gb:.1f} GiB even with every layer checkpointed (estimated {estimate:.1f} GiB): 1 row"


def _liger_available_for(model) -> bool:
    """Whether configure_model_for_speed will fuse the LM head with Liger (so the logits are never materialised)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None or next(model.parameters()).device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - an unusable Liger means no fused head
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def load_lora_model(model_dir: Path, config: TrainConfig, env: dict, *, trust_remote_code: bool = False, fast: bool = False):
    """The base model (quantized as `env` says) wrapped in a fresh peft LoRA adapter.

    `fast`: the packed CUDA path; prepare_model_for_kbit_training is skipped (its fp32 upcast of frozen tensors
    and all-layer checkpointing cost speed): configure_model_for_speed sets the model up after this."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if env["precision"] == "bf16" else torch.float32
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if env["quantization"] == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Storage dtype = compute dtype keeps the packed weights shardable by FSDP later.
            bnb_4bit_quant_storage=dtype,
        )
    elif env["quantization"] == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if env["device"] == "cuda" and config.distributed != "fsdp":
        # One whole model per process (DDP): on this process's GPU, {"": local_rank}.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    # FSDP (peft's FSDP-QLoRA recipe): no device_map; with cpu_ram_efficient_loading rank 0 reads the weights and
    # FSDP broadcasts them, and bitsandbytes puts the 4-bit weights on the current device (set per rank).
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    # Not under FSDP: its fp32 upcast of norms and embeddings would mix dtypes inside FSDP's flat parameters.
    if env["quantization"] != "none" and not fast and config.distributed != "fsdp":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def training_arguments(config: TrainConfig, env: dict, checkpoints_dir: Path, *, rows_per_micro_batch: int | None = None,
                       fast: bool = False, packing: bool = False):
    """transformers TrainingArguments for `config` (works with transformers 5.17 on the GPU image and 5.23 here).

    `fast` (packed CUDA path): Trainer's gradient checkpointing stays off, since configure_model_for_speed has
    set it per layer and Trainer's switch would turn it on for every layer."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = dict(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=rows_per_micro_batch or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=env["optimizer"],
        bf16=env["precision"] == "bf16",
        fp16=False,
        # Every step is logged: the non-finite guard and the loss curve need each step's loss and grad norm.
        logging_steps=1,
        logging_nan_inf_filter=False,  # the default hides NaN losses from the log, and so from the guard
        save_strategy="steps",
        save_steps=config.checkpoint_every,
        save_total_limit=config.keep_checkpoints,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our StepRecorder draws the bar (with tokens/s)
        use_cpu=env["device"] == "cpu",
    )
    if config.distributed == "ddp":
        # Every LoRA weight gets a gradient each step; searching for unused ones costs a graph walk and a warning.
        kwargs["ddp_find_unused_parameters"] = False
    if config.group_by_length and not packing:  # packed rows are already of similar length
        if "train_sampling_strategy" in fields:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    # transformers 5.23 renamed gradient checkpointing to activation checkpointing; 5.17 (GPU image) has the old name.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[checkpointing] = config.gradient_checkpointing and not fast
    kwargs[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio).
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = config.warmup_ratio
    else:
        kwargs["warmup_steps"] = config.warmup_ratio
    return TrainingArguments(**kwargs)


# ---- data ----------------------------------------------------------------------------------------------

class TokenizedExamples:
    """The train rows as a map-style dataset of {input_ids, attention_mask, labels} (plain int lists)."""

    def __init__(self, rows: pd.DataFrame):
        self.items = [
            {
                "input_ids": [int(t) for t in ids],
                "attention_mask": [int(m) for m in mask],
                "labels": [int(label) for label in labels],
            }
            for ids, mask, labels in zip(rows["input_ids"], rows["attention_mask"], rows["labels"])
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def resumable_trainer_class():
    """transformers' Trainer whose length-grouped batch order depends only on (seed, epoch).

    Trainer's LengthGroupedSampler draws its order from the global RNG when an epoch starts; a resumed run
    restores that RNG only after the resumed epoch has begun, so it would see the first epoch's order again
    (measured: resumed losses off by up to 0.3 on CPU fp32; with this sampler they are equal)."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:  # accelerate's DataLoaderShard.set_epoch forwards here
            self.epoch = epoch

        def __iter__(self):
            self.generator.manual_seed(self.seed + self.epoch)
            return super().__iter__()

    class ResumableTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):  # (self, train_dataset=None) in 5.23, (self) in older releases
            sampler = super()._get_train_sampler(*args, **kwargs)
            if type(sampler) is not LengthGroupedSampler:
                return sampler
            # Grouped by global batch: every process draws the same order, and accelerate deals its micro-batches
            # out in turn, so N processes see the same examples per optimizer step as one process would.
            batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochSeededLengthGroupedSampler(batch_size, list(sampler.lengths), self.args.data_seed or self.args.seed)

    return ResumableTrainer


class PadByPosition:
    """Right-pads a batch; padding positions get attention 0 and label -100 by *position*.

    The pad id often equals EOS (SmolLM2: both `<|im_end|>`), so masking labels by pad id would also mask
    the EOS the model must learn to emit. transformers' DataCollatorForSeq2Seq pads labels by position too,
    but routes input ids through tokenizer.pad; here only the pad id is needed. Counts real tokens seen so
    the progress bar can show tokens/s.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokens_seen = 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            attention_mask[row, :n] = torch.tensor(feature["attention_mask"])
            labels[row, :n] = torch.tensor(feature["labels"])
        self.tokens_seen += int(attention_mask.sum())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _load_tokens(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None) -> tuple[pd.DataFrame, str]:
    """The tokens frame and the hash that identifies it (the artifact's sha256, or that of the frame)."""
    if isinstance(tokens, pd.DataFrame):
        return tokens, hashlib.sha256(table_bytes(tokens[["id", "input_ids", "labels", "split"]])).hexdigest()
    from data_contracts import TOKENS
    from loraflow.stage import read_input

    store = store or store_for(tokens)
    return read_input(store, tokens, TOKENS), tokens.sha256


def store_for(ref: ArtifactRef) -> ArtifactStore:
    """The store an artifact lives in, from its uri (`<root>/artifacts/<stage>/<sha>.parquet`)."""
    marker = "/artifacts/"
    if marker not in ref.uri:
        raise ValueError(f"{ref.uri}: not inside an artifact store (no /artifacts/ in the path); pass store=")
    return ArtifactStore(ref.uri.rsplit(marker, 1)[0])


# ---- callbacks -----------------------------------------------------------------------------------------

def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class StepRecorder(_callback_base()):
    """Records each step's loss, grad norm, lr and tokens/s (the loss curve), draws the progress bar and logs
    an ETA after the first few steps (then at every tenth of the run).

    `collator` is anything with a running `tokens_seen` count (PadByPosition, loraflow.training.PackedCollator).
    """

    ETA_AFTER_STEPS = 3

    def __init__(self, collator, log=None):
        self.collator = collator
        self.log = log
        self.rows: list[dict] = []
        self.bar = None
        self._started = (time.perf_counter(), 0)  # (time, tokens_seen) when training (re)started
        self._next_eta = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)
        self._started = (time.perf_counter(), sum_over_processes(self.collator.tokens_seen))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        # The dataloader fetches ahead, so per-step token counts jitter; the rate is averaged since the start.
        # Summed over launched processes (every process logs each step, so the collective lines up): global tokens/s.
        now, seen = time.perf_counter(), sum_over_processes(self.collator.tokens_seen)
        elapsed = now - self._started[0]
        tokens_per_s = (seen - self._started[1]) / elapsed if elapsed > 0 else None
        row = {
            "step": state.global_step,
            "epoch": logs.get("epoch", state.epoch),
            "loss": _float(logs.get("loss")),
            "grad_norm": _float(logs.get("grad_norm")),
            "learning_rate": _float(logs.get("learning_rate")),
            "tokens_seen": seen,
            "tokens_per_second": tokens_per_s,
            "elapsed_s": now - self._started[0],
        }
        self.rows.append(row)
        if self.bar is not None:
            self.bar.n = state.global_step
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tokens_per_s or 0:,.0f}", refresh=True)
        self._log_eta(state.global_step, state.max_steps)

    def _log_eta(self, step: int, max_steps: int) -> None:
        """After ETA_AFTER_STEPS steps, then every tenth of the run: seconds per step (first step left out: it
        holds warm-up) and the time left."""
        if self.log is None or len(self.rows) <= self.ETA_AFTER_STEPS or step >= max_steps:
            return
        if self._next_eta is not None and step < self._next_eta:
            return
        self._next_eta = step + max(1, max_steps // 10)
        first, last = self.rows[0], self.rows[-1]
        per_step = (last["elapsed_s"] - first["elapsed_s"]) / max(1, last["step"] - first["step"])
        left = per_step * (max_steps - step)
        self.log.info("train: step %d/%d, %.1f s/step, about %s left (ETA %s)", step, max_steps, per_step,
                      _duration(left), time.strftime("%H:%M:%S", time.localtime(time.time() + left)))

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def tokens_per_second(self, after_first_step: bool = False) -> float | None:
        """Non-padding tokens per second since (re)start, or from the first logged step to the last
        (`after_first_step`: leaves out the first step's compilation and warm-up; None with fewer than 2 steps)."""
        if after_first_step:
            if len(self.rows) < 2:
                return None
            first, last = self.rows[0], self.rows[-1]
            elapsed = last["elapsed_s"] - first["elapsed_s"]
            return round((last["tokens_seen"] - first["tokens_seen"]) / elapsed, 1) if elapsed > 0 else None
        if not self.rows:
            return None
        elapsed = self.rows[-1]["elapsed_s"]
        tokens = self.rows[-1]["tokens_seen"] - self._started[1]
        return round(tokens / elapsed, 1) if elapsed > 0 else None


class StepReport(_callback_base()):
    """Calls `on_step(step, max_steps, loss)` for each logged optimizer step."""

    def __init__(self, on_step):
        self.on_step = on_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.on_step(state.global_step, state.max_steps, _float(logs.get("loss")))


class NonFiniteGuard(_callback_base()):
    """Stops training with NonFiniteTrainingError after `patience` consecutive non-finite steps."""

    def __init__(self, patience: int):
        self.patience = patience
        self.streak = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss, grad_norm = _float(logs.get("loss")), _float(logs.get("grad_norm"))
        bad = not _finite(loss) or (grad_norm is not None and not _finite(grad_norm))
        self.streak = self.streak + 1 if bad else 0
        if self.streak >= self.patience:
            raise NonFiniteTrainingError(
                f"train: loss {loss} / grad norm {grad_norm} non-finite for {self.streak} consecutive steps "
                f"(up to step {state.global_step}); stopped. Lower train.learning_rate (now {args.learning_rate}), "
                f"keep train.max_grad_norm clipping on, or check the data for empty/garbage rows."
            )


class CheckpointMarker(_callback_base()):
    """Writes `loraflow-complete.json` into a checkpoint after the Trainer has finished saving it.

    Trainer writes checkpoint files in place (no temp folder), so a crash can leave a partial
    `checkpoint-N`; only folders with this marker, whose listed files still have their sizes, are resumed from.
    """

    def __init__(self, identity: dict, main_process: bool = True):
        self.identity = identity
        self.main_process = main_process

    def on_save(self, args, state, control, **kwargs):
        # Launched: each process writes its part (RNG state, FSDP shards); the marker waits for all of them.
        barrier()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not self.main_process or not folder.is_dir():
            return
        files = {
            str(path.relative_to(folder)): path.stat().st_size
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != CHECKPOINT_MARKER
        }
        _write_json_atomic(folder / CHECKPOINT_MARKER, {"step": state.global_step, "identity": self.identity, "files": files})


# ---- checkpoints, identity, resume ---------------------------------------------------------------------

def run_identity(data_sha: str, model_dir: Path, config: TrainConfig) -> dict:
    """What an adapter is made from: data hash, base model fingerprint, and the settings that shape training."""
    settings = config.model_dump(mode="json", exclude=set(RESUME_NEUTRAL_SETTINGS))
    return {"data_sha256": data_sha, "base_model": base_model_fingerprint(model_dir), "train": settings}


def base_model_fingerprint(model_dir: Path) -> str:
    """Hash of the base model's config.json and weight index/size, cheap enough to compute on every run."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        path = Path(model_dir) / name
        if path.exists():
            digest.update(name.encode() + path.read_bytes())
    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def identity_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identities: 'train.learning_rate: 0.0002 (checkpoint) -> 0.001 (now)'."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            differences += identity_differences(old, new, f"{name}.")
        elif old != new:
            differences.append(f"{name}: {old!r} (checkpoint) -> {new!r} (now)")
    return differences


def latest_complete_checkpoint(checkpoints_dir: Path, log=log_default) -> Path | None:
    """Newest checkpoint with a marker whose files are all present with their sizes; partial ones are removed."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]), reverse=True,
    )
    newest_complete = None
    for folder in candidates:
        if newest_complete is None and checkpoint_is_complete(folder):
            newest_complete = folder
        elif newest_complete is None:
            log.warning("train: %s is incomplete (no completion marker or missing files); removing it", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return newest_complete


def checkpoint_is_complete(folder: Path) -> bool:
    marker_path = folder / CHECKPOINT_MARKER
    if not marker_path.exists():
        return False
    try:
        marker = json.loads(marker_path.read_text())
    except ValueError:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in marker["files"].items())


def _finished_result(output_dir: Path, fingerprint: str) -> TrainResult | None:
    manifest_path = output_dir / "adapter" / ADAPTER_MANIFEST
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("fingerprint") != fingerprint:
        return None
    return TrainResult(**{**manifest["result"], "reused": True})


def save_adapter(model, adapter_dir: Path, manifest: dict, saved_by_trainer: Path | None = None) -> None:
    """Save the adapter into a staging folder, write its manifest last, then swap it into place.
    `saved_by_trainer`: a folder Trainer.save_model already wrote (FSDP); only its safetensors and configs are kept."""
    staging = adapter_dir.with_name(f".{adapter_dir.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    if saved_by_trainer is None:
        model.save_pretrained(staging, safe_serialization=True)
    else:
        os.replace(saved_by_trainer, staging)
        for path in staging.iterdir():  # training_args.bin is a pickle: never shipped
            if path.is_file() and path.suffix not in (".safetensors", ".json", ".md"):
                path.unlink()
    _check_has_lora_tensors(staging)
    files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    _write_json_atomic(staging / ADAPTER_MANIFEST, {**manifest, "files": files})
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(staging, adapter_dir)


def _check_has_lora_tensors(folder: Path) -> None:
    """Refuse an adapter file without LoRA weights (an empty gather), so it is never evaluated or published."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    names = []
    if weights.exists():
        with safe_open(str(weights), framework="pt") as handle:
            names = [name for name in handle.keys() if "lora_" in name]
    if not names:
        raise RuntimeError(f"{weights}: the saved adapter holds no LoRA tensors; refusing it (nothing was gathered "
                           "from the training processes). Train without train.distributed=fsdp until docs/scaling.md "
                           "says FSDP saving works.")


# ---- several processes ---------------------------------------------------------------------------------

def _distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    if not _distributed_ready():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def barrier() -> None:
    """Wait for every launched process (nothing to wait for in one process)."""
    if _distributed_ready():
        import torch.distributed as dist

        dist.barrier()


def sum_over_processes(value: int) -> int:
    """`value` summed over the launched processes (a collective: every process must call it); itself in one."""
    if not _distributed_ready():
        return value
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())


# ---- reporting -----------------------------------------------------------------------------------------

def plot_loss_curve(curve: pd.DataFrame, path: Path) -> str | None:
    """Loss (and learning rate) per step as a PNG; None when there is nothing to plot."""
    if curve.empty or curve["loss"].isna().all():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(curve["step"], curve["loss"], label="train loss", color="tab:blue")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    if curve["learning_rate"].notna().any():
        rate_axis = axis.twinx()
        rate_axis.plot(curve["step"], curve["learning_rate"], color="tab:orange", alpha=0.5, label="learning rate")
        rate_axis.set_ylabel("learning rate")
    axis.set_title("loraflow train loss")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def peak_memory(device: str) -> tuple[int, str]:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux; it covers the whole process, not only training.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def library_versions() -> dict:
    """Versions of the libraries that shape training (for metrics and the model card)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "huggingface_hub"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def _parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _float(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as handle:
        json.dump(payload, handle, indent=1, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


# ---- Prefect wrapper -----------------------------------------------------------------------------------

try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect: the plain function above is what runs there
    task = None

if task is not None:

    @task(name="train")  # cached and locked by the flow (loraflow.tasking.run_locked)
    def train_task(
        tokens: ArtifactRef, model_dir: str, train_config: TrainConfig, output_dir: str, store_root: str,
        base_fingerprint: str = "", trust_remote_code: bool = False,
    ) -> TrainResult:
        """Prefect task around `train_adapter` (base_fingerprint only feeds the cache key); a progress
        artifact in the UI follows the optimizer steps. With train.distributed the launched processes' output
        streams into this task's log, and rank 0's result is this task's result."""
        from prefect import get_run_logger
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        progress_id = create_progress_artifact(progress=0.0, key="training-progress", description="training steps done (%)")

        def report_progress(step: int, max_steps: int, loss: float | None) -> None:
            if max_steps:
                update_progress_artifact(progress_id, progress=round(100.0 * step / max_steps, 1))

        result = train_adapter(
            tokens, model_dir, train_config, output_dir, store=ArtifactStore(store_root),
            trust_remote_code=trust_remote_code, log=get_run_logger(), on_step=report_progress,
        )
        update_progress_artifact(progress_id, progress=100.0)
        return result
