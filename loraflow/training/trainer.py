"""The transformers Trainer of the train stage: its arguments, its callbacks, and training with resume.

    trainer, recorder = build_trainer(model, batches, train_config, checkpoints_dir, identity=identity)
    train_output = train_resuming(trainer, resume_from, checkpoints_dir, log)

Callbacks: StepRecorder (the loss curve, tokens/s, the progress bar and an ETA), NonFiniteGuard (stops on a run
of NaN/inf steps), CheckpointMarker (loraflow.training.checkpoints: marks a checkpoint complete), StepReport
(`on_step` for the Prefect progress artifact), and transformers' MLflowCallback inside BestEffortTracking
(loraflow.tracking.mlflow_run: a tracker failure while training is a warning). `ResumableTrainer` draws its length-grouped batch order from
(seed, epoch) so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import TrainerCallback

from loraflow.config.train import TrainConfig
from loraflow.modeling.cpu_threads import ThreadsForLoad
from loraflow.runtime.artifact_store import DISK_FULL_ERRNOS, disk_full
from loraflow.tracking.mlflow_run import interrupted_run_id, wrap_tracking_callbacks
from loraflow.tracking.report_to import report_to_value, send_tensorboard_to, tracking_environment
from loraflow.training.checkpoints import CheckpointMarker, latest_complete_checkpoint
from loraflow.training.distributed import is_main_process, sum_over_processes
from loraflow.training.fsdp_checkpoint import FsdpAdapterCheckpoint
from loraflow.training.plan import TrainPlan
from loraflow.training.result import NonFiniteTrainingError
from loraflow.training.version_guard import require_verified


def build_trainer(model, batches, config: TrainConfig, checkpoints_dir: Path, *, identity: dict,
                  on_step=None, callbacks: list | None = None, log=None, run_name: str | None = None,
                  tracking_params: dict[str, str] | None = None, resume_from: Path | None = None):
    """The Trainer over `batches` (loraflow.training.data.BatchPlan, with its TrainPlan) with loraflow's callbacks; returns
    (trainer, its StepRecorder). Refuses train.distributed=fsdp when accelerate did not set FSDP up; under FSDP
    each checkpoint keeps the gathered adapter and a resume from `resume_from` restores it (fsdp_checkpoint.py).
    `run_name` names the trackers' run; `tracking_params` (the flattened pipeline config) go to the MLflow run."""
    import torch
    from transformers import PrinterCallback, ProgressCallback

    main_process = is_main_process()
    plan = batches.plan
    if config.group_by_length and not plan.packing:  # ResumableTrainer's sampler replaces Trainer's private hook
        require_verified("transformers", "The epoch-seeded length-grouped batch order (loraflow.training.trainer "
                         "overrides Trainer._get_train_sampler)", "train.group_by_length=false")
    Trainer = resumable_trainer_class()
    recorder = StepRecorder(batches.collator, log if main_process else None)
    guard = NonFiniteGuard(config.nonfinite_patience)
    marker_writer = CheckpointMarker(identity, main_process)
    # Before the marker: it lists the checkpoint's files, the gathered adapter among them.
    fsdp_adapter = [FsdpAdapterCheckpoint(resume_from, log if main_process else None)] if config.distributed == "fsdp" else []
    trainer = Trainer(
        model=model,
        args=training_arguments(config, plan, checkpoints_dir, run_name=run_name),
        train_dataset=batches.examples,
        data_collator=batches.collator,
        callbacks=[recorder, guard, *fsdp_adapter, marker_writer, *([StepReport(on_step)] if on_step else []),
                   *(callbacks or [])],
    )
    if plan.device == "cpu" and trainer.args.world_size == 1:  # the cores other processes leave free
        trainer.add_callback(ThreadsForLoad(log if main_process else None))
    for default_printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default_printer)
    wrap_tracking_callbacks(trainer, tracking_params, log)  # a tracker that fails mid-run must not stop training
    if config.distributed == "fsdp" and not trainer.is_fsdp_enabled:
        raise RuntimeError(f"train.distributed=fsdp but accelerate set up {trainer.accelerator.distributed_type.value}: "
                           "launch through train_adapter (accelerate launch with loraflow's FSDP config) on CUDA GPUs")
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return trainer, recorder


def train_resuming(trainer, resume_from: Path | None, checkpoints_dir: Path, log, config: TrainConfig | None = None):
    """trainer.train, from `resume_from` when given; a disk that fills while saving a checkpoint raises
    DiskFullError saying which checkpoint is intact (a re-run resumes from it)."""
    try:
        send_tensorboard_to(trainer, checkpoints_dir.parent / "tensorboard")
        resume_run_id = interrupted_run_id(checkpoints_dir) if resume_from else None
        with tracking_environment(config, checkpoints_dir, resume_run_id):  # MLflow / W&B read them when training begins
            return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except OSError as error:  # out of space while saving a checkpoint: say so, and what a re-run resumes from
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        kept = latest_complete_checkpoint(checkpoints_dir, log)  # also removes the partial one, freeing its space
        raise disk_full(error, error.filename or str(checkpoints_dir), "a checkpoint in",
                        f"{kept.name} is intact and a re-run resumes from it" if kept else "No checkpoint was complete yet") from error


def training_arguments(config: TrainConfig, plan: TrainPlan, checkpoints_dir: Path, *, run_name: str | None = None):
    """transformers TrainingArguments for `config` as `plan` runs it (works with transformers 5.17 on the GPU image
    and 5.23 here).

    On the fast path (plan.fast_path) Trainer's gradient checkpointing stays off, since configure_model_for_speed
    has set it per layer and Trainer's switch would turn it on for every layer."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = dict(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=plan.rows_per_micro_batch or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=plan.optimizer,
        bf16=plan.precision == "bf16",
        fp16=False,
        # Every step is logged: the non-finite guard and the loss curve need each step's loss and grad norm.
        logging_steps=1,
        logging_nan_inf_filter=False,  # the default hides NaN losses from the log, and so from the guard
        save_strategy="steps",
        save_steps=config.checkpoint_every,
        save_total_limit=config.keep_checkpoints,
        report_to=report_to_value(config.report_to),  # transformers' own integrations (loraflow.tracking.report_to)
        run_name=run_name,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our StepRecorder draws the bar (with tokens/s)
        use_cpu=plan.device == "cpu",
    )
    if config.neftune_noise_alpha is not None:  # transformers' own NEFTune: noise on the input embeddings while training
        kwargs["neftune_noise_alpha"] = config.neftune_noise_alpha
    if config.distributed == "ddp":
        # Every LoRA weight gets a gradient each step; searching for unused ones costs a graph walk and a warning.
        kwargs["ddp_find_unused_parameters"] = False
    if config.group_by_length and not plan.packing:  # packed rows are already of similar length
        if "train_sampling_strategy" in fields:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    # transformers 5.23 renamed gradient checkpointing to activation checkpointing; 5.17 (GPU image) has the old name.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[checkpointing] = config.gradient_checkpointing and not plan.fast_path
    kwargs[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio).
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = config.warmup_ratio
    else:
        kwargs["warmup_steps"] = config.warmup_ratio
    return TrainingArguments(**kwargs)


def grouped_by_length(args) -> bool:
    """Whether TrainingArguments ask for length-grouped batches (train_sampling_strategy in transformers 5.23,
    group_by_length before)."""
    return getattr(args, "train_sampling_strategy", None) == "group_by_length" or bool(getattr(args, "group_by_length", False))


def resumable_trainer_class():
    """transformers' Trainer whose length-grouped batch order depends only on (seed, epoch).

    Trainer's LengthGroupedSampler draws its order from the global RNG when an epoch starts; a resumed run
    restores that RNG only after the resumed epoch has begun, so it would see the first epoch's order again
    (measured: resumed losses off by up to 0.3 on CPU fp32; with this sampler they are equal). Its 8-bit
    optimizer steps with one device sync (`loraflow.training.optimizer`)."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from loraflow.training.optimizer import synchronising_once

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
        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            # bitsandbytes' 8-bit optimizers (paged_adamw_8bit) with one device sync per step, not per parameter.
            optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
            return synchronising_once(optimizer_class), kwargs

        def _get_train_sampler(self, *args, **kwargs):  # (self, train_dataset=None) in 5.23, (self) in older releases
            # Grouped by global batch: every process draws the same order, and accelerate deals its micro-batches
            # out in turn, so N processes see the same examples per optimizer step as one process would.
            batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            seed = self.args.data_seed or self.args.seed
            known = getattr(self.train_dataset, "lengths", None)  # TokenizedExamples: no pass over every example
            if known is not None and grouped_by_length(self.args):
                return EpochSeededLengthGroupedSampler(batch_size, known.tolist(), seed)
            sampler = super()._get_train_sampler(*args, **kwargs)
            if type(sampler) is not LengthGroupedSampler:
                return sampler
            return EpochSeededLengthGroupedSampler(batch_size, list(sampler.lengths), seed)

    return ResumableTrainer


# ---- callbacks -----------------------------------------------------------------------------------------

class StepRecorder(TrainerCallback):
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
        self.first_step_at: float | None = None  # perf_counter() when the first optimizer step was logged

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
        self.first_step_at = self.first_step_at or now
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

    def final_loss(self) -> float | None:
        """The last logged step's loss (None before any)."""
        return next((r["loss"] for r in reversed(self.rows) if r.get("loss") is not None), None)

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


class StepReport(TrainerCallback):
    """Calls `on_step(step, max_steps, loss)` for each logged optimizer step."""

    def __init__(self, on_step):
        self.on_step = on_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.on_step(state.global_step, state.max_steps, _float(logs.get("loss")))


class NonFiniteGuard(TrainerCallback):
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
