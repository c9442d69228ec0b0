"""What a finished training run writes: the loss curve (Parquet + PNG), metrics.json and the adapter.

    gathered = gather_after_training(trainer, batches.collator, output_dir)   # every process: collectives first
    save_outputs(result, ...)                                                # rank 0 only

Also the measurements that go into them: peak memory, and the versions of the libraries that shape training
(the model card lists them too).
"""

from __future__ import annotations

import logging
import resource
import shutil
from pathlib import Path

import pandas as pd

from loraflow.runtime.atomic_files import write_json_atomic
from loraflow.config.train import TrainConfig
from loraflow.training.checkpoints import save_adapter, write_gathered_adapter
from loraflow.training.distributed import sum_over_processes, world_size
from loraflow.training.result import TrainResult

log_default = logging.getLogger("loraflow.train")


def gather_after_training(trainer, collator, output_dir: Path) -> dict:
    """Token counts summed over processes, and under FSDP the adapter gathered whole into a folder (each process
    holds a shard of it). Collectives: every process must call this. Returns tokens_seen, trained_tokens_seen and
    fsdp_saved (the folder Trainer saved, or None)."""
    tokens_seen = sum_over_processes(collator.tokens_seen)
    trained_tokens_seen = getattr(collator, "trained_tokens_seen", None)
    if trained_tokens_seen is not None:
        trained_tokens_seen = sum_over_processes(trained_tokens_seen)
    fsdp_saved = None
    if trainer.is_fsdp_enabled:
        # Gather the full state dict (a collective; rank 0 receives it, offloaded to CPU) and write the adapter
        # from it ourselves: peft's save_pretrained drops every LoRA key of an FSDP-wrapped model
        # (adapter_tensors_from_full_state_dict says why).
        fsdp_saved = output_dir / ".adapter-fsdp"
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        full_state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.accelerator.is_main_process:
            shutil.rmtree(fsdp_saved, ignore_errors=True)
            write_gathered_adapter(trainer.accelerator.unwrap_model(trainer.model), full_state_dict, fsdp_saved)
    return {"tokens_seen": tokens_seen, "trained_tokens_seen": trained_tokens_seen, "fsdp_saved": fsdp_saved}


def save_outputs(result: TrainResult, *, model, trainer, train_output, curve_rows: list[dict], batches, gathered: dict,
                 config: TrainConfig, identity: dict, parameters: tuple[int, int], log=log_default) -> None:
    """Loss curve, plot, metrics.json, then the adapter (manifest last); then drop the checkpoints. Sets
    result.loss_plot_path (None when there was nothing to plot)."""
    output_dir = Path(result.metrics_path).parent
    output_dir.mkdir(parents=True, exist_ok=True)
    curve = pd.DataFrame(curve_rows)
    curve.to_parquet(result.loss_curve_path, index=False)
    result.loss_plot_path = plot_loss_curve(curve, output_dir / "loss_curve.png")
    trainable, total = parameters
    metrics = {
        **result.model_dump(),
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "trainable_parameters": trainable,
        "packing_stats": batches.packing_stats,
        "tokens_seen": gathered["tokens_seen"],
        "trained_tokens_seen": gathered["trained_tokens_seen"],
        # What actually ran: accelerate's distributed type (NO, MULTI_CPU, MULTI_GPU, FSDP) and the process count.
        "distributed": {"strategy": config.distributed, "processes": world_size(),
                        "accelerate_distributed_type": trainer.accelerator.distributed_type.value},
        "total_parameters": total,
        "train_config": config.model_dump(mode="json"),
        "identity": identity,
        "library_versions": library_versions(),
    }
    write_json_atomic(Path(result.metrics_path), metrics)
    save_adapter(model, Path(result.adapter_dir), manifest={"fingerprint": result.fingerprint, "identity": identity,
                                                           "result": result.model_dump()},
                 saved_by_trainer=gathered["fsdp_saved"])
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    log.info(
        "train: done in %.0f s, %d steps, final loss %s, %s tokens/s (%s after the first step), peak memory %.2f GB (%s); "
        "adapter at %s",
        result.seconds, result.global_step, f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a",
        f"{result.tokens_per_second:,.0f}" if result.tokens_per_second else "n/a",
        f"{result.tokens_per_second_after_first_step:,.0f}" if result.tokens_per_second_after_first_step else "n/a",
        result.peak_memory_bytes / 1e9, result.peak_memory_kind, result.adapter_dir,
    )


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
    """(bytes, kind): CUDA's peak allocation since Trainer was built, or the process's peak RSS on CPU."""
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
