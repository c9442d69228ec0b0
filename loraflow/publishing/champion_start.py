"""Where a train.init_from=champion run starts: the champion's adapter and the data it was trained on.

    start, why_fresh = champion_start(open_registry(store, local_root), ArtifactStore(store), "anime-demo",
                                      config.train, tokens_sha, local_root)

The adapter is the one published in the champion's model folder (`<model_dir>/adapter/`; with an s3:// store,
fetched from the store when another host published it: loraflow.publishing.registry.model_dir_here), named by the hash of its
files (the train stage's cache key holds it); the data is the TOKENS artifact the champion's run read, found in the
store by the sha256 its version record holds. When there is nothing to continue from (no champion yet, its adapter
or data gone) the answer is None with the reason, and the flow trains fresh with a warning.

A champion trained on exactly the current data gives the adapter *it* started from (None when it was fresh): the
train stage's key is then the one that made the champion, so an unchanged nightly run is a cache hit, not another
round of training on the replayed rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from loraflow.config.train import TrainConfig
from loraflow.publishing.registry import Registry, model_dir_here
from loraflow.runtime.artifact_store import ArtifactStore, file_sha256
from loraflow.training.continuation import StartAdapter, check_lora_settings

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def champion_start(registry: Registry, store: ArtifactStore, name: str, train_config: TrainConfig,
                   tokens_sha256: str, local_root: Path | None = None) -> tuple[StartAdapter | None, str | None]:
    """(the adapter to continue from, None to train fresh; why fresh where the champion cannot be continued, else
    None). ContinuationError when the champion's LoRA settings differ from `train_config`'s. `local_root`: this
    host's folder for the store, where a champion published by another host is fetched (the store's by default)."""
    record = registry.champion(name)
    if record is None:
        return None, f"{name} has no champion yet (nothing published in {registry.where})"
    where = f"version {record['version']} in {registry.where}/{name}/versions"
    champion_tokens = (record.get("data") or {}).get("tokens_sha256")
    if not champion_tokens or "train" not in (record.get("config") or {}):
        return None, f"the champion's record ({where}) names no training data or config (published by an older loraflow)"
    if champion_tokens == tokens_sha256:  # the champion's own data: its own start (see above)
        held = record.get("init_from")
        return (StartAdapter(**held) if held else None), None
    adapter_dir = model_dir_here(record, store.root, local_root or Path(store.root)) / "adapter"
    if not all((adapter_dir / file).exists() for file in ADAPTER_FILES):
        return None, f"the champion's adapter ({where}) is not in {adapter_dir}"
    tokens = store.find(champion_tokens)
    if tokens is None:
        return None, f"the champion's training data (tokens {champion_tokens[:12]}…, {where}) is no longer in the store {store.root}"
    check_lora_settings(record["config"]["train"], train_config, where)
    return StartAdapter(model_name=name, version=record["version"], adapter_dir=str(adapter_dir),
                        adapter_sha256=adapter_sha256(adapter_dir), tokens=tokens), None


def adapter_sha256(adapter_dir: Path) -> str:
    """The content hash of an adapter: its weights and its config."""
    digests = [f"{file}:{file_sha256(adapter_dir / file)}" for file in ADAPTER_FILES]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()
