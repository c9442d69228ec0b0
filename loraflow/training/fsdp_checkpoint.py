"""FSDP-QLoRA checkpoints keep the trained adapter, and a resume puts it back.

Trainer saves an FSDP checkpoint with accelerate's `save_fsdp_model(adapter_only=True)` and loads it with
`load_fsdp_model(adapter_only=True)`: peft's get/set_peft_model_state_dict on the FSDP1-wrapped model. The load
runs with strict=False and every LoRA key comes back missing (the mid-name `_fsdp_wrapped_module.` again, see
`checkpoints.adapter_tensors_from_full_state_dict`; reproduced on CPU with gloo), so a resumed run silently
restarted from the initial adapter: on an H200 the resumed step 3 had step 1's loss (2026-12-03).

So each FSDP checkpoint also holds the adapter gathered through FSDP's full state dict (`FSDP_ADAPTER_FILE`,
written before the completion marker, so the marker vouches for it), and on resume `FsdpAdapterCheckpoint` loads
it back through FSDP's full state dict after Trainer has restored the rest (optimizer, scheduler, RNG, step),
checking that every LoRA tensor was taken.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.training.distributed import is_main_process

FSDP_ADAPTER_FILE = "loraflow-fsdp-adapter.safetensors"


def _fsdp_root(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        return model
    raise RuntimeError(f"expected the FSDP-wrapped model, got {type(model).__name__}")


def _full_state_dict_type(root, rank0_only: bool):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only))


def save_fsdp_adapter(model, folder: Path) -> None:
    """Gather the FSDP model's LoRA tensors (a collective: every process calls it) and write them on rank 0."""
    from safetensors.torch import save_file

    root = _fsdp_root(model)
    with _full_state_dict_type(root, rank0_only=True):
        full = root.state_dict()
    if is_main_process():
        lora = {name: tensor.detach().contiguous().cpu() for name, tensor in full.items() if "lora_" in name}
        if not lora:
            raise RuntimeError("the FSDP model's full state dict holds no LoRA tensors; nothing to checkpoint")
        save_file(lora, str(Path(folder) / FSDP_ADAPTER_FILE), metadata={"format": "pt"})


def restore_fsdp_adapter(model, folder: Path) -> int:
    """Load a checkpoint's gathered LoRA tensors into the FSDP model (every process); returns how many."""
    from safetensors.torch import load_file

    path = Path(folder) / FSDP_ADAPTER_FILE
    if not path.exists():
        raise RuntimeError(f"{folder} has no {FSDP_ADAPTER_FILE}: an FSDP checkpoint written before loraflow kept the "
                           "adapter in it cannot be resumed correctly. Delete the checkpoints folder to start over.")
    saved = load_file(str(path))
    root = _fsdp_root(model)
    with _full_state_dict_type(root, rank0_only=False):
        result = root.load_state_dict(saved, strict=False)
    not_loaded = sorted(set(saved) & set(result.missing_keys)) + sorted(result.unexpected_keys)
    if not_loaded:
        raise RuntimeError(f"restoring the adapter from {path}: {len(not_loaded)} tensors were not taken "
                           f"(first: {not_loaded[0]})")
    return len(saved)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class FsdpAdapterCheckpoint(_callback_base()):
    """Under FSDP: writes the gathered adapter into each checkpoint (before `CheckpointMarker` marks it complete)
    and, when resuming from `resume_from`, loads it back once Trainer has restored the checkpoint."""

    def __init__(self, resume_from: Path | None, log=None):
        self.resume_from, self.log = resume_from, log

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resume_from is not None:
            restored = restore_fsdp_adapter(model, self.resume_from)
            if self.log is not None:
                self.log.info("train: FSDP resume: %d LoRA tensors restored from %s", restored, self.resume_from)

    def on_save(self, args, state, control, model=None, **kwargs):
        save_fsdp_adapter(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")
