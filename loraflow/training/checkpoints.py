"""Checkpoints and the adapter's identity: what a run is made from, which checkpoint to resume, the saved adapter.

    identity = run_identity(data_sha, model_dir, train_config)       # data + base model + settings that shape training
    done = finished_result(output_dir, identity_fingerprint(identity))  # a complete adapter for the same inputs
    resume_from, step = resume_point(checkpoints_dir, identity, train_config, log)

Trainer writes a checkpoint's files in place, so `CheckpointMarker` writes `loraflow-complete.json` (the step,
the identity and every file's size) after Trainer has finished saving; only a folder with a marker whose files
still have their sizes is resumed from, and partial ones are removed. The adapter is saved into a staging folder,
its manifest (`loraflow-adapter.json`: fingerprint, identity, TrainResult, file hashes) written last, then
swapped into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from loraflow.runtime.atomic_files import atomic_folder, write_json_atomic
from loraflow.config.train import TrainConfig
from loraflow.runtime.artifact_store import file_sha256
from loraflow.training.distributed import barrier
from loraflow.training.result import ResumeMismatchError, TrainResult

ADAPTER_MANIFEST = "loraflow-adapter.json"
CHECKPOINT_MARKER = "loraflow-complete.json"
# Settings that may change between a crash and its re-run without changing what is trained.
RESUME_NEUTRAL_SETTINGS = ("allow_resume_mismatch", "checkpoint_every", "keep_checkpoints", "nonfinite_patience", "cpu_threads")
log_default = logging.getLogger("loraflow.train")


# ---- identity ------------------------------------------------------------------------------------------

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


def identity_fingerprint(identity: dict) -> str:
    """The adapter's identity as a short hash (TrainResult.fingerprint, the adapter manifest's key)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# ---- finished adapter and resume -----------------------------------------------------------------------

def finished_result(output_dir: Path, fingerprint: str) -> TrainResult | None:
    """The TrainResult of a complete adapter in `output_dir` made from the same inputs (reused=True), else None."""
    manifest_path = output_dir / "adapter" / ADAPTER_MANIFEST
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("fingerprint") != fingerprint:
        return None
    return TrainResult(**{**manifest["result"], "reused": True})


def resume_point(checkpoints_dir: Path, identity: dict, config: TrainConfig, log=log_default) -> tuple[Path | None, int | None]:
    """(checkpoint folder, its step) to resume from, or (None, None) to start over.

    ResumeMismatchError, listing what differs, when the newest complete checkpoint was made from other inputs
    (unless train.allow_resume_mismatch). The step is read now: Trainer rotates old checkpoints away while it trains."""
    resume_from = latest_complete_checkpoint(checkpoints_dir, log)
    if resume_from is None:
        return None, None
    marker = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
    differences = identity_differences(marker["identity"], identity)
    if differences and not config.allow_resume_mismatch:
        raise ResumeMismatchError(
            f"{resume_from} was written for other inputs; refusing to resume:\n  " + "\n  ".join(differences)
            + f"\nDelete {checkpoints_dir} to start over, or set train.allow_resume_mismatch=true to continue anyway."
        )
    if differences:
        log.warning("train: resuming from %s despite differences: %s", resume_from, "; ".join(differences))
    log.info("train: resuming from %s (step %s)", resume_from, marker["step"])
    return resume_from, marker["step"]


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



class CheckpointMarker(TrainerCallback):
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
        write_json_atomic(folder / CHECKPOINT_MARKER, {"step": state.global_step, "identity": self.identity, "files": files})


# ---- the adapter ---------------------------------------------------------------------------------------

def save_adapter(model, adapter_dir: Path, manifest: dict, saved_by_trainer: Path | None = None) -> None:
    """Save the adapter into a staging folder, write its manifest last, then swap it into place.
    `saved_by_trainer`: a folder Trainer.save_model already wrote (FSDP); only its safetensors and configs are kept."""
    with atomic_folder(adapter_dir) as staging:
        if saved_by_trainer is None:
            model.save_pretrained(staging, safe_serialization=True)
        else:
            os.replace(saved_by_trainer, staging)  # onto the empty staging folder
            for path in staging.iterdir():  # training_args.bin is a pickle: never shipped
                if path.is_file() and path.suffix not in (".safetensors", ".json", ".md"):
                    path.unlink()
        _check_has_lora_tensors(staging)
        files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        write_json_atomic(staging / ADAPTER_MANIFEST, {**manifest, "files": files})


def adapter_tensors_from_full_state_dict(full_state_dict: dict, adapter_name: str = "default") -> dict:
    """The LoRA tensors of a gathered full state dict, keyed as peft saves them (adapter name removed).

    Why not peft's own filter: peft 0.21 finds adapter keys by walking the model's module names and strips only a
    leading `_fsdp_wrapped_module.`; under FSDP1 with one unit per decoder layer (and per LoRA layer) the prefix sits
    mid-name (`layers.0._fsdp_wrapped_module.self_attn...`), no key matches and `save_pretrained` writes an adapter
    with no tensors (reproduced on CPU with gloo, one process). FSDP's full state dict already has clean names, so
    its keys are selected by peft's key convention instead: `lora_` + `.<adapter>` (LoRA with bias none)."""
    marker = f".{adapter_name}"
    return {name.replace(marker, "", 1): tensor for name, tensor in full_state_dict.items()
            if "lora_" in name and marker in name}


def write_gathered_adapter(peft_model, full_state_dict: dict, folder: Path, adapter_name: str = "default") -> None:
    """Write a peft adapter folder (adapter_model.safetensors + adapter_config.json) from a gathered state dict."""
    from safetensors.torch import save_file

    tensors = adapter_tensors_from_full_state_dict(full_state_dict, adapter_name)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config[adapter_name].save_pretrained(str(folder))


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
