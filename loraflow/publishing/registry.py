"""Champion and challenger: every publish is a numbered version of a model name; one version is the champion.

Kept in the store beside the models (`<store>/published/`):

    <name>/versions/0001.json   one record per publish: metrics, data fingerprints, the full resolved config, code
                                version, Prefect flow-run id, where the model is (written once, never changed)
    <name>/history.jsonl        every move of the champion: publish, promote, rollback; who, why, when
    <name>.json                 the champion's record (what the next gate compares against; `loraflow ask` users
                                and older readers look here)

A version number is taken by creating its file exclusively, so two publishes at once get two numbers. Moving the
champion appends to the history first, then rewrites `<name>.json` atomically.

With an `s3://` store the registry is in the bucket, `<store>/published/`, in the same layout, so every host that
shares the store sees the same versions and champion (loraflow.publishing.bucket_registry: numbers taken and the
champion moved with conditional puts). Both are a `Registry`, chosen once from the store:

    registry = open_registry(store_root, local_root)   # FolderRegistry, or BucketRegistry for s3://
    number = registry.add_version("anime", record)
    registry.move_champion("anime", number, action="publish", why="passed the gate")
    model_dir = model_dir_here(registry.champion("anime"), store_root, local_root)  # fetched if another host made it
"""

from __future__ import annotations

import getpass
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loraflow.runtime.artifact_store import is_url
from loraflow.runtime.atomic_files import write_json_atomic
from loraflow.runtime.store_folders import local_copy


class RegistryError(ValueError):
    """A model name or version that the registry does not hold; the message says what it does hold."""


def registry_root(local_store: Path) -> Path:
    """`<store>/published`: the registry of every model name published from this store."""
    return Path(local_store) / "published"


def add_version(root: Path, name: str, record: dict) -> int:
    """Write `record` as the next version of `name` and return its number (taken atomically)."""
    folder = root / name / "versions"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        number = max((int(p.stem) for p in folder.glob("*.json")), default=0) + 1
        try:
            with open(folder / f"{number:04d}.json", "x", encoding="utf-8") as handle:
                json.dump({**record, "model_name": name, "version": number}, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            return number
        except FileExistsError:  # another publish took this number first
            continue


def versions(root: Path, name: str) -> list[dict]:
    """Every version of `name`, oldest first."""
    return [json.loads(p.read_text()) for p in sorted((root / name / "versions").glob("*.json"))]


def version(root: Path, name: str, number: int) -> dict:
    """Version `number` of `name`, or RegistryError naming the versions there are."""
    path = root / name / "versions" / f"{number:04d}.json"
    if not path.exists():
        held = [v["version"] for v in versions(root, name)]
        raise RegistryError(f"{name}: no version {number} in {root} (versions: {held or 'none'}) -> "
                            f"`loraflow models {name}` lists them")
    return json.loads(path.read_text())


def history(root: Path, name: str) -> list[dict]:
    """Every move of `name`'s champion, oldest first."""
    path = root / name / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def champion(root: Path, name: str) -> dict | None:
    """The champion's version record (None before the first publish)."""
    path = root / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def move_champion(root: Path, name: str, number: int, *, action: str, why: str, by: str | None = None,
                  hub_tag: dict | None = None) -> dict:
    """Make version `number` the champion of `name`, recording the move (publish / promote / rollback), who and
    why, and where the Hub's `champion` tag went with it (`hub_tag`, when the version is on the Hub); returns the
    history entry."""
    record = version(root, name, number)
    entry = move_entry(champion(root, name), number, action=action, why=why, by=by, hub_tag=hub_tag)
    with open(root / name / "history.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    write_json_atomic(root / f"{name}.json", {**record, "champion_since": entry})
    return entry


def rollback_target(root: Path, name: str) -> int:
    """The version that was champion before the current one (the target of `loraflow rollback NAME`)."""
    return previous_champion(name, champion(root, name), history(root, name), str(root))


def move_entry(current: dict | None, number: int, *, action: str, why: str, by: str | None,
               hub_tag: dict | None) -> dict:
    """The history entry of a move of the champion from `current` (its record; None before the first) to `number`."""
    return {"action": action, "version": number, "from_version": current.get("version") if current else None,
            "by": by or current_user(), "why": why, "at": time.time(), **({"hub_tag": hub_tag} if hub_tag else {})}


def previous_champion(name: str, current: dict | None, moves: list[dict], where: str) -> int:
    """The version that was champion before `current` (its record), read from the history `moves`; RegistryError
    when there is none (`where`: the registry, for the message)."""
    if current is None:
        raise RegistryError(f"{name}: nothing published in {where}, so there is nothing to roll back")
    for entry in reversed(moves):  # how the current one first came in (a rollback steps further back)
        if entry["version"] == current["version"] and entry["action"] != "rollback" and entry.get("from_version"):
            return entry["from_version"]
    raise RegistryError(f"{name}: version {current['version']} is the first champion; there is none before it -> "
                        f"`loraflow promote {name} VERSION` picks one")


def current_user() -> str:
    """Who moves the champion: $LORAFLOW_USER, else the login name."""
    try:
        return os.environ.get("LORAFLOW_USER") or getpass.getuser()
    except Exception:  # no login name (some containers)
        return "unknown"


class Registry(Protocol):
    """The versions and champion of every model name of one store (FolderRegistry or BucketRegistry)."""

    where: str  # the folder or URL, for messages

    def add_version(self, name: str, record: dict) -> int: ...
    def versions(self, name: str) -> list[dict]: ...
    def version(self, name: str, number: int) -> dict: ...
    def history(self, name: str) -> list[dict]: ...
    def champion(self, name: str) -> dict | None: ...
    def move_champion(self, name: str, number: int, *, action: str, why: str, by: str | None = None,
                      hub_tag: dict | None = None) -> dict: ...
    def rollback_target(self, name: str) -> int: ...


@dataclass(frozen=True)
class FolderRegistry:
    """The registry in a folder (`registry_root(local store)`): this module's functions on `root`."""

    root: Path

    @property
    def where(self) -> str:
        """The folder, for messages."""
        return str(self.root)

    def add_version(self, name: str, record: dict) -> int:
        """`add_version` in this folder."""
        return add_version(self.root, name, record)

    def versions(self, name: str) -> list[dict]:
        """`versions` in this folder."""
        return versions(self.root, name)

    def version(self, name: str, number: int) -> dict:
        """`version` in this folder."""
        return version(self.root, name, number)

    def history(self, name: str) -> list[dict]:
        """`history` in this folder."""
        return history(self.root, name)

    def champion(self, name: str) -> dict | None:
        """`champion` in this folder."""
        return champion(self.root, name)

    def move_champion(self, name: str, number: int, *, action: str, why: str, by: str | None = None,
                      hub_tag: dict | None = None) -> dict:
        """`move_champion` in this folder."""
        return move_champion(self.root, name, number, action=action, why=why, by=by, hub_tag=hub_tag)

    def rollback_target(self, name: str) -> int:
        """`rollback_target` in this folder."""
        return rollback_target(self.root, name)


def open_registry(store_root: str, local_root: Path) -> Registry:
    """The registry of a store: in the bucket for an `s3://` store (every host sees it), else the folder
    `registry_root(local_root)` (the store's own folder; for another URL store, this host's folder for it)."""
    if str(store_root).startswith("s3://"):
        from loraflow.publishing.bucket_registry import BucketRegistry  # boto3: only for s3 stores

        return BucketRegistry(store_root)
    return FolderRegistry(registry_root(local_root))


def model_dir_here(record: dict, store_root: str, local_root: Path) -> Path:
    """A version's model folder on this host: with a URL store, this host's copy of its `model_url` in the store
    (fetched and verified when missing here; still missing when the store holds no complete copy); else, or for a
    version recorded without one, its `model_dir`."""
    if record.get("model_url") and is_url(store_root):
        return local_copy(store_root, record["model_url"], local_root)
    return Path(record["model_dir"])
