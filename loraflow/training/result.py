"""What a training run returns (TrainResult) and the two ways it refuses to go on (non-finite loss, resume mismatch).

Shared by the train stage (tasks/train.py) and the multi-process launcher (loraflow.training.launch), which reads
rank 0's TrainResult back from JSON and raises rank 0's errors again in the caller.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from loraflow.tracking.report_to import TrackingRun
from loraflow.training.continuation import ContinuationPlan
from loraflow.training.plan import TrainPlan


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
    fsdp_memory: dict | None = Field(
        None, description="Under train.distributed=fsdp: the per-GPU peak estimate made before loading (GiB, with parts).",
    )
    tokens_per_second_after_first_step: float | None = Field(
        None, description="Non-padding tokens/s from the end of the first step to the last (leaves out compilation/warm-up).",
    )
    first_step_seconds: float | None = Field(
        None, description="Seconds from the train stage's start to its first optimizer step (inputs, model load, plan, "
        "the first step's warm-up); None when no step ran.",
    )
    packing: bool = Field(False, description="Whether examples were packed into rows.")
    rows_per_micro_batch: int | None = Field(None, description="Packed rows (or examples) per forward pass.")
    speed_plan: dict | None = Field(
        None, description="loraflow.training SpeedPlan of the fast path (what was applied, and why not the rest); None off it.",
    )
    seconds: float
    device: str = Field(..., description="cuda or cpu: where training ran.")
    device_name: str | None = Field(None, description="The GPU's name on CUDA, else the CPU and its torch threads.")
    quantization: str = Field(..., description="Quantization actually used (none on CPU).")
    quantization_reason: str | None = Field(
        None, description="Why it is not train.quantization (no CUDA device: CPU trains unquantized); None when it is.",
    )
    precision: str
    precision_reason: str | None = Field(None, description="Why this precision (loraflow.modeling.precision: CPU bf16 support, benchmark).")
    optimizer: str
    data_sha256: str
    fingerprint: str = Field(..., description="Hash of data + base model + training config: the adapter's identity.")
    tracking: TrackingRun | None = Field(
        None, description="The MLflow run training reported to (train.report_to has mlflow); the later stages add to it.",
    )
    plan: TrainPlan | None = Field(
        None, description="What ran and why (loraflow.training.plan): device, precision, quantization, packing, "
                          "micro-batch, checkpointing, attention, optimizer, processes. None only for results of older runs.",
    )
    continuation: ContinuationPlan | None = Field(
        None, description="train.init_from=champion: the champion adapter it continued from and the rows it trained "
                          "(changed, replayed); None for a fresh adapter.",
    )
