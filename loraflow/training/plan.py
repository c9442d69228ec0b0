"""TrainPlan: what this machine will run for a TrainConfig, decided once, logged, and passed down.

    plan = plan_training(train_config, model_dir, longest_example, log)        # before anything heavy loads
    model = load_lora_model(model_dir, train_config, plan)
    batches = plan_batches(model, train_rows, train_config, plan, pad_id, log)  # batches.plan: the completed plan
    TrainResult(..., plan=batches.plan)                                        # and so into summary.json

Decided before the model loads (`plan_training`): the device, precision and quantization (each with why), the
optimizer, packing, whether the packed fast path runs (and why not), the processes and launcher, and the memory
budget checks that can refuse before any weight loads. The fast path's micro-batch settings (rows per micro-batch,
checkpointed and offloaded layers, attention, lean recompute) need the loaded model's sizes: the step planner
(loraflow.training.micro_batch) adds them to this same plan (`TrainPlan.with_micro_batch`), once.

train.distributed runs `plan_training` in each launched process (the processes' own devices decide), rank 0's plan
comes back in its TrainResult; the launcher itself decides only the processes (loraflow.training.launch).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loraflow.config.train import TrainConfig
from loraflow.training.fsdp_memory import describe, fsdp_peak_per_gpu, smallest_budget_message
from loraflow.training.memory_model import MemoryBudgetError, check_memory_budget


class TrainPlan(BaseModel):
    """What the train stage runs on this machine, and why where it differs from what was asked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["cuda", "cpu"] = Field(..., description="Where training runs.")
    device_name: str = Field(..., description="The GPU's name on CUDA, else the CPU and its torch threads.")
    precision: Literal["bf16", "fp32"]
    precision_reason: str = Field(..., description="Why (loraflow.modeling.precision: GPU support, CPU benchmark).")
    quantization: Literal["4bit", "8bit", "none"] = Field(..., description="The base weights' quantization that runs.")
    quantization_reason: str | None = Field(None, description="Why it is not train.quantization; None when it is.")
    optimizer: str = Field(..., description="transformers' optim name (train.optimizer, or auto's choice).")
    packing: bool = Field(..., description="Examples packed into rows (train.packing resolved for this device).")
    fast_path: bool = Field(..., description="The packed CUDA fast path (configure_model_for_speed) runs.")
    fast_path_reason: str = Field(..., description="Why the fast path runs, or why not.")
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    processes: int = Field(1, description="Training processes (train.distributed: one per GPU, or CPU processes).")
    launcher: Literal["accelerate"] | None = Field(None, description="What started the processes; None: this one.")
    cpu_threads: int | None = Field(None, description="torch's CPU threads set for training (train.cpu_threads).")
    fsdp_memory: dict | None = Field(None, description="Under FSDP: the per-GPU peak estimate (GiB, with parts).")
    # ---- the fast path's micro-batch, added once the model is loaded (with_micro_batch) ----
    rows_per_micro_batch: int | None = Field(None, description="Packed rows (or examples) per forward pass.")
    rows_choice: str | None = Field(None, description="Why that many rows (budget, predicted speed, or the config).")
    row_tokens: int | None = Field(None, description="Tokens per packed row.")
    attention: str | None = Field(None, description="The attention implementation the fast path set.")
    checkpointed_layers: int | None = None
    offloaded_layers: int | None = Field(None, description="Checkpointed layers whose inputs live in CPU memory.")
    total_layers: int | None = None
    lean_recompute: bool | None = Field(None, description="Checkpointed layers skip their last GEMM on recompute.")
    speed: dict | None = Field(None, description="The fast path's whole SpeedPlan (what was applied, why not the rest).")

    def with_micro_batch(self, rows: int, rows_choice: str, row_tokens: int | None = None,
                         speed: dict | None = None) -> TrainPlan:
        """This plan with the micro-batch the step planner chose (and the fast path's SpeedPlan, when it ran)."""
        applied = {}
        if speed is not None:
            applied = dict(attention=speed["attn_implementation"], checkpointed_layers=speed["checkpointed_layers"],
                           offloaded_layers=speed["offloaded_layers"], total_layers=speed["total_layers"],
                           lean_recompute=speed["lean_recompute"], speed=speed)
        return self.model_copy(update=dict(rows_per_micro_batch=rows, rows_choice=rows_choice, row_tokens=row_tokens,
                                           **applied))

    def describe(self) -> str:
        """One log line: what runs, and why where it differs from the config."""
        line = (f"device={self.device} ({self.device_name}) precision={self.precision} ({self.precision_reason}) "
                f"quantization={self.quantization} optimizer={self.optimizer} packing={self.packing} "
                f"fast path={self.fast_path} ({self.fast_path_reason})")
        if self.launcher:
            line += f" {self.distributed} on {self.processes} processes ({self.launcher})"
        return line


def plan_training(config: TrainConfig, model_dir: str | Path, longest_example: int, log, *,
                  processes: int = 1) -> TrainPlan:
    """The TrainPlan for `config` on this machine, logged; torch's CPU threads set (train.cpu_threads). Refuses
    (MemoryBudgetError) a train.memory_budget_gb the fast path or FSDP cannot keep, before any weights load.
    `processes`: how many processes train together (the launched processes pass their world size)."""
    import torch

    from loraflow.modeling.precision import choose_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        precision = choose_precision(config.precision, device)
    except ValueError as error:
        raise ValueError(f"train.precision: {error}") from None
    if device == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    packing = packing_enabled(config, device)
    fast, fast_reason = fast_path_choice(config, device)
    quantization = config.quantization if device == "cuda" else "none"
    plan = TrainPlan(
        device=device, device_name=device_name(device), precision=precision.precision,
        precision_reason=precision.reason, quantization=quantization,
        quantization_reason=(None if quantization == config.quantization else
                             f"no CUDA device, so train.quantization={config.quantization} runs unquantized "
                             "(16-bit base) on CPU"),
        optimizer=resolve_optimizer(config, device), packing=packing, fast_path=fast, fast_path_reason=fast_reason,
        distributed=config.distributed, processes=processes,
        launcher="accelerate" if config.distributed != "none" else None,
        cpu_threads=config.cpu_threads if device == "cpu" else None,
    )
    if plan.quantization_reason:
        log.warning("train: %s; the code path is otherwise the same", plan.quantization_reason)
    log.info("train: plan %s", plan.describe())
    if fast:
        check_budget_before_loading(model_dir, config, quantization, longest_example, offload=device == "cuda")
    if config.distributed == "fsdp":
        plan = plan.model_copy(update={"fsdp_memory": fsdp_memory_estimate(model_dir, config, quantization, packing,
                                                                           longest_example, processes)})
    return plan


def packing_enabled(config: TrainConfig, device: str) -> bool:
    """train.packing resolved for `device`: "auto" packs on CUDA (the fast path) and not on CPU."""
    if config.packing == "auto":
        return device == "cuda"
    return bool(config.packing)


def fast_path_choice(config: TrainConfig, device: str) -> tuple[bool, str]:
    """(whether the packed fast path runs on `device`, why). It runs on CUDA; packing on CPU keeps the CPU settings.
    Not under FSDP: its fused LoRA epilogues and per-layer checkpointing reach into modules FSDP has flattened and
    wrapped (measured nowhere yet), so FSDP packs with document masks and Trainer's checkpointing."""
    if not packing_enabled(config, device):
        return False, "train.packing=auto packs on CUDA only" if config.packing == "auto" else "packing is off"
    if device != "cuda":
        return False, "no CUDA device: packed rows with the CPU settings"
    if config.distributed == "fsdp":
        return False, "train.distributed=fsdp: document masks and Trainer's checkpointing, no model surgery"
    return True, "packed rows on CUDA"


def resolve_optimizer(config: TrainConfig, device: str) -> str:
    """train.optimizer, or for "auto" paged 8-bit AdamW on CUDA and torch's AdamW elsewhere. Under FSDP paged 8-bit
    AdamW fails when a checkpoint is saved (peft's FSDP-QLoRA caveats), so FSDP gets torch's."""
    if config.optimizer != "auto":
        return config.optimizer
    return "paged_adamw_8bit" if device == "cuda" and config.distributed != "fsdp" else "adamw_torch"


def device_name(device: str) -> str:
    """The accelerator's name on CUDA ("NVIDIA H200"), else the CPU with torch's thread count."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"


# ---- memory: refuse, before the model loads, a budget no plan can meet -----------------------------------

def check_budget_before_loading(model_dir: str | Path, config: TrainConfig, quantization: str, longest_example: int,
                                *, offload: bool = False) -> None:
    """Refuse (MemoryBudgetError, naming the smallest budget that works) a train.memory_budget_gb that even one
    packed row with every layer checkpointed (`offload`, on CUDA: inputs offloaded) cannot keep: read from
    config.json, before any weights load."""
    config_file = Path(model_dir) / "config.json"
    if config.memory_budget_gb is None or not config_file.exists():
        return
    try:
        check_memory_budget(
            json.loads(config_file.read_text()), max(config.pack_max_tokens, longest_example), config.memory_budget_gb,
            lora_r=config.lora_r, target_modules=config.target_modules, quantization=quantization,
            fused_head=importlib.util.find_spec("liger_kernel") is not None, offload=offload,
        )
    except (AttributeError, KeyError, TypeError):  # not a Llama-style config: the plan after loading decides alone
        return


def _fsdp_plan_inputs(model_dir: str | Path, config: TrainConfig, quantization: str, packing: bool,
                      longest_example: int) -> tuple[dict, int, dict] | None:
    """(config.json, tokens per micro-batch, the estimate's keyword arguments), or None without a config.json.
    Tokens per micro-batch: packed rows x row length, or padded rows x the longest example."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        return None
    if packing:
        tokens = (config.pack_rows_per_micro_batch or config.micro_batch_size) * max(config.pack_max_tokens, longest_example)
    else:
        tokens = config.micro_batch_size * longest_example
    options = dict(lora_r=config.lora_r, target_modules=config.target_modules, quantization=quantization,
                   checkpointing=config.gradient_checkpointing)
    return json.loads(config_file.read_text()), tokens, options


def fsdp_memory_estimate(model_dir: str | Path, config: TrainConfig, quantization: str, packing: bool,
                         longest_example: int, processes: int) -> dict | None:
    """Per-GPU peak of FSDP-QLoRA with `processes` processes (loraflow.training.fsdp_memory), from config.json; None
    when there is none or it is not Llama-style."""
    inputs = _fsdp_plan_inputs(model_dir, config, quantization, packing, longest_example)
    if inputs is None:
        return None
    model_config, tokens, options = inputs
    try:
        return fsdp_peak_per_gpu(model_config, processes, tokens, **options)
    except (AttributeError, KeyError, TypeError):
        return None


def check_fsdp_budget(model_dir: str | Path, config: TrainConfig, longest_example: int, processes: int, log) -> dict | None:
    """Log FSDP's per-GPU peak estimate before launching; MemoryBudgetError (naming the GPU count or budget that
    would work) when it exceeds train.memory_budget_gb. FSDP runs on CUDA only: train.quantization as configured,
    train.packing as on CUDA."""
    quantization, packing = config.quantization, packing_enabled(config, "cuda")
    estimate = fsdp_memory_estimate(model_dir, config, quantization, packing, longest_example, processes)
    if estimate is None:
        return None
    log.info("train: %s", describe(estimate))
    if config.memory_budget_gb is not None and estimate["total_gib"] > config.memory_budget_gb:
        model_config, tokens, options = _fsdp_plan_inputs(model_dir, config, quantization, packing, longest_example)
        raise MemoryBudgetError(smallest_budget_message(model_config, config.memory_budget_gb, processes, tokens, **options))
    return estimate
