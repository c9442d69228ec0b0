"""FSDP-QLoRA checkpoints keep the trained adapter, and a resume puts it back.

Trainer saves an FSDP checkpoint with accelerate's `save_fsdp_model(adapter_only=True)` and loads it with
`load_fsdp_model(adapter_only=True)`: peft's get/set_peft_model_state_dict on the FSDP1-wrapped model. The load
runs with strict=False and every LoRA key comes back missing (the mid-name `_fsdp_wrapped_module.` again, see
`checkpoints.adapter_tensors_from_full_state_dict`; reproduced on CPU with gloo), so a resumed run silently
restarted from the initial adapter: on an H200 the resumed step 3 had step 1's loss (2026-12-03).

So each FSDP checkpoint also holds the adapter gathered through FSDP's full state dict (`FSDP_ADAPTER_FILE`,
written before the completion marker, so the marker vouches for it), and on resume `FsdpAdapterCheckpoint` loads
it back through FSDP's full state dict after Trainer has restored the rest (scheduler, RNG, step), checking that
every LoRA tensor was taken.

The optimizer has the same trouble: accelerate's `load_fsdp_optimizer` asks the not-yet-stepped optimizer for its
state dict as the load target, which holds no state, so the checkpoint's Adam moments and step count are never read
and the resumed run's first update is a fresh optimizer's (on an H200 the resumed step 4's loss was 10.14 against
9.67 uninterrupted, 2026-12-04). `restore_fsdp_optimizer` builds the target with torch's
`get_optimizer_state_dict` (which creates the state first) and loads the checkpoint's `optimizer_0` into it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from loraflow.training.distributed import is_main_process

FSDP_ADAPTER_FILE = "loraflow-fsdp-adapter.safetensors"
OPTIMIZER_FOLDER = "optimizer_0"  # where accelerate's save_fsdp_optimizer writes a sharded optimizer state


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


def restore_fsdp_optimizer(model, optimizer, folder: Path) -> int:
    """Load a checkpoint's sharded optimizer state (accelerate's `optimizer_0`) into the FSDP model's optimizer
    (every process); returns how many parameters' state came back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(folder) / OPTIMIZER_FOLDER
    if not path.exists():
        raise RuntimeError(f"{folder} has no {OPTIMIZER_FOLDER}: the checkpoint holds no optimizer state to resume from")
    root = _fsdp_root(model)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    target = {"optimizer": get_optimizer_state_dict(root, optimizer)}  # creates the state the load fills in
    dcp.load(target, checkpoint_id=str(path))
    set_optimizer_state_dict(root, optimizer, target["optimizer"])
    restored = len(target["optimizer"]["state"])
    if restored == 0:
        raise RuntimeError(f"restoring the optimizer from {path}: no parameter's state was found")
    return restored


class FsdpAdapterCheckpoint(TrainerCallback):
    """Under FSDP: writes the gathered adapter into each checkpoint (before `CheckpointMarker` marks it complete)
    and, when resuming from `resume_from`, loads it and the optimizer state back once Trainer has restored the rest."""

    def __init__(self, resume_from: Path | None, log=None):
        self.resume_from, self.log = resume_from, log

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.resume_from is not None:
            tensors = restore_fsdp_adapter(model, self.resume_from)
            optimizer_states = restore_fsdp_optimizer(model, optimizer, self.resume_from)
            if self.log is not None:
                self.log.info("train: FSDP resume: %d LoRA tensors and the optimizer state of %d parameters restored "
                              "from %s", tensors, optimizer_states, self.resume_from)

    def on_save(self, args, state, control, model=None, **kwargs):
        save_fsdp_adapter(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")
