"""The merge of an adapter into its unquantized base, its numerical check, and the saved model folder.

    merged, tokenizer, max_diff = merge_adapter(model_dir, adapter_dir, verify_texts, tolerance=1e-3)
    saved_dtype, files = save_merged(merged, tokenizer, folder, model_dir=..., adapter_dir=..., card=..., run_info=...)

Never merged into 4-bit weights (merging into quantized weights rounds the adapter away): the base is reloaded in
publish.merge_dtype, the adapter attached, reference logits taken on a few validation texts, merge_and_unload,
and MergeVerificationError if any logit moved more than the tolerance. The folder is written into a staging
folder, its saved weights re-read and compared bit for bit, its manifest written last, then renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loraflow.runtime.atomic_files import atomic_folder, write_json_atomic, write_text_atomic
from loraflow.runtime.artifact_store import file_sha256

MODEL_MANIFEST = "loraflow-manifest.json"
SAVE_SHARD_SIZE = "2GB"
RUN_INFO = "loraflow.json"


class MergeVerificationError(RuntimeError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""


class PublishError(RuntimeError):
    """Publishing cannot proceed (missing token, remote files that do not match, ...)."""


# ---- merge and verify ----------------------------------------------------------------------------------

def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, verify_texts: list[str], *, tolerance: float,
                  dtype: str = "float32", trust_remote_code: bool = False, timing: dict | None = None):
    """Base (unquantized, `dtype`) + adapter, merged; returns (merged model, tokenizer, max |Δlogit|). `timing` gets
    the seconds of the base's load ("load")."""
    import time

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
        device_map={"": 0} if torch.cuda.is_available() else None,
    )
    if timing is not None:
        timing["load"] = round(time.perf_counter() - started, 2)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    inputs = verification_batch(tokenizer, verify_texts, next(model.parameters()).device)
    reference = _logits(model, inputs)
    merged = model.merge_and_unload()
    merged.eval()
    return merged, tokenizer, check_merge(merged, inputs, reference, tolerance)


def verification_batch(tokenizer, texts: list[str], device) -> dict:
    """The verification texts tokenized (right padding, no added special tokens) on `device`."""
    if not texts:
        raise ValueError("the merge check needs at least one text (validation prompts + references)")
    tokenizer.padding_side = "right"
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)


def _logits(model, inputs: dict):
    import torch

    with torch.inference_mode():
        return model(**inputs).logits.float()


def check_merge(merged_model, inputs: dict, reference_logits, tolerance: float) -> float:
    """Max |logit difference| over real (non-padding) positions; MergeVerificationError above `tolerance`."""
    mask = inputs["attention_mask"].bool()
    difference = (_logits(merged_model, inputs) - reference_logits).abs()[mask]
    max_diff = float(difference.max())
    if not max_diff <= tolerance:  # also catches NaN
        raise MergeVerificationError(
            f"merged model differs from base + adapter: max |logit difference| {max_diff:.4g} > publish.merge_tolerance "
            f"{tolerance:g} on {int(mask.sum())} positions. The merged weights are wrong; nothing was published."
        )
    return max_diff


# ---- save ----------------------------------------------------------------------------------------------
def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an answer (generation_config's eos_token_id): EOS and the template's end-of-turn tokens."""
    from loraflow.evaluation.generation import stop_token_ids

    return stop_token_ids(tokenizer)


def save_merged(merged, tokenizer, folder: Path, *, model_dir: Path, adapter_dir: Path, card: str, run_info: dict) -> tuple[str, dict]:
    """Write the merged model folder atomically (staging, manifest last, rename); returns (dtype, files)."""
    import torch
    from transformers import GenerationConfig

    saved_dtype = _base_dtype(model_dir)
    merged = merged.to(getattr(torch, saved_dtype))
    with atomic_folder(folder) as staging:
        # safetensors turns a whole shard into host bytes before writing: 2 GB shards keep that to 2 GB (transformers'
        # default of 50 GB made it the whole model: 16 GB for an 8B, issue 31).
        merged.save_pretrained(staging, safe_serialization=True, max_shard_size=SAVE_SHARD_SIZE)
        verify_saved_weights(merged, staging)
        tokenizer.save_pretrained(staging)
        if (model_dir / "generation_config.json").exists():
            generation = GenerationConfig.from_pretrained(model_dir)
        else:
            generation = GenerationConfig()
        eos = end_of_turn_ids(tokenizer)
        generation.eos_token_id = eos if len(eos) > 1 else eos[0]
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        generation.save_pretrained(staging)
        shutil.copytree(adapter_dir, staging / "adapter", ignore=shutil.ignore_patterns("README.md"))
        write_text_atomic(staging / "README.md", card)
        write_json_atomic(staging / RUN_INFO, run_info)
        files = folder_hashes(staging)
        write_json_atomic(staging / MODEL_MANIFEST, {"files": files, "saved_dtype": saved_dtype})
        files[MODEL_MANIFEST] = file_sha256(staging / MODEL_MANIFEST)
    return saved_dtype, files


def verify_saved_weights(model, folder: Path) -> None:
    """Every tensor in the saved safetensors equals the in-memory one bit for bit (catches a bad write); compared
    where the model lives, one tensor at a time."""
    import torch
    from safetensors import safe_open

    state = model.state_dict()
    seen = set()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                seen.add(name)
                if name in state and not torch.equal(handle.get_tensor(name).to(state[name].device), state[name].detach()):
                    raise PublishError(f"{shard.name}: tensor {name} differs from the merged model after saving")
    if not seen:
        raise PublishError(f"{folder}: no safetensors weights were written")


def _base_dtype(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"


def folder_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
