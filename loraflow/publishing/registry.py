"""Champion and challenger: every publish is a numbered version of a model name; one version is the champion.

Kept in the store beside the models (`<store>/published/`):

    <name>/versions/0001.json   one record per publish: metrics, data fingerprints, the full resolved config, code
                                version, Prefect flow-run id, where the model is (written once, never changed)
    <name>/history.jsonl        every move of the champion: publish, promote, rollback; who, why, when
    <name>.json                 the champion's record (what the next gate compares against; `loraflow ask` users
                                and older readers look here)

A version number is taken by creating its file exclusively, so two publishes at once get two numbers. Moving the
champion appends to the history first, then rewrites `<name>.json` atomically.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path

from loraflow.runtime.atomic_files import write_json_atomic


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
    current = champion(root, name)
    entry = {"action": action, "version": number, "from_version": current.get("version") if current else None,
             "by": by or current_user(), "why": why, "at": time.time(), **({"hub_tag": hub_tag} if hub_tag else {})}
    with open(root / name / "history.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    write_json_atomic(root / f"{name}.json", {**record, "champion_since": entry})
    return entry


def rollback_target(root: Path, name: str) -> int:
    """The version that was champion before the current one (the target of `loraflow rollback NAME`)."""
    current = champion(root, name)
    if current is None:
        raise RegistryError(f"{name}: nothing published in {root}, so there is nothing to roll back")
    for entry in reversed(history(root, name)):  # how the current one first came in (a rollback steps further back)
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
