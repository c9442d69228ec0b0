"""`loraflow models / promote / rollback`: list a model name's versions and move its champion (who and why recorded).

The record lives in the store (loraflow.publishing.registry; in the bucket for an s3:// store, so a promote on one host
moves the champion every host sees); a version published to the Hub gets the Hub tag
`champion` first (loraflow.publishing.hub.move_champion_tag: when the Hub refuses, nothing moves), and with MLflow
registration on, the alias `champion` moves with it (loraflow.tracking.mlflow_run.set_champion_alias).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

DEFAULT_STORE = ".loraflow/store"  # = PipelineConfig.store's default, relative to the working directory


def add_model_commands(command) -> None:
    """Register the three subcommands with `command(name, handler, help)` (loraflow.cli.commands.build_parser)."""
    store_help = f"the config's store folder (default: {DEFAULT_STORE}, as in a config that names none)"
    listed = command("models", cmd_models, "list a model name's published versions and which one is the champion")
    listed.add_argument("name", help="the model name (the config's `name`)")
    listed.add_argument("--store", default=DEFAULT_STORE, help=store_help)
    promote = command("promote", cmd_promote, "make a published version the champion (the next gate compares against it)")
    promote.add_argument("name", help="the model name (the config's `name`)")
    promote.add_argument("version", type=int, help="the version number `loraflow models NAME` lists")
    rollback = command("rollback", cmd_rollback, "give the champion back to the version before it (or --to VERSION)")
    rollback.add_argument("name", help="the model name (the config's `name`)")
    rollback.add_argument("--to", type=int, default=None, help="the version to go back to (default: the champion before this one)")
    for sub in (promote, rollback):
        sub.add_argument("--store", default=DEFAULT_STORE, help=store_help)
        sub.add_argument("--why", required=True, help="why the champion moves; recorded in the model's history")
        sub.add_argument("--by", default=None, help="who moves it (default: $LORAFLOW_USER, else the login name)")


def store_folder(store: str) -> Path:
    """This host's folder for a store: a local store's own folder, or for an object-store URL its folder in the
    loraflow cache (loraflow.runtime.stage_task.local_root)."""
    if "://" in store and not store.startswith("file://"):
        from loraflow.runtime.stage_task import local_root  # imports Prefect: only for object stores

        return local_root(store)
    return Path(store.removeprefix("file://")).resolve()


def registry_of(store: str):
    """The registry of a store (loraflow.publishing.registry.open_registry): its folder for a local store, the bucket
    for an s3:// one (another object-store URL keeps it in this host's folder for the store)."""
    from loraflow.publishing.registry import open_registry

    return open_registry(store, store_folder(store))


def champion_model_dir(store: str, name: str) -> Path:
    """The model folder of `name`'s champion on this host (fetched from an s3:// store when another host published
    it); RegistryError when there is no champion or its folder is in neither place."""
    from loraflow.publishing.registry import RegistryError, model_dir_here

    registry = registry_of(store)
    record = registry.champion(name)
    if record is None:
        raise RegistryError(f"{name}: nothing published in {registry.where} -> `loraflow run CONFIG` publishes it")
    model_dir = model_dir_here(record, store, store_folder(store))
    if not model_dir.exists():
        raise RegistryError(f"{name} version {record['version']}: its model folder is not in {model_dir} (nor in the "
                            f"store: {record.get('model_url') or 'not recorded'}) -> publish it again, or "
                            f"`loraflow promote {name} VERSION` another version")
    return model_dir


def cmd_models(args) -> int:
    """Print every version of NAME: number, champion mark, when, headline metrics, code, flow run."""
    registry = registry_of(args.store)
    held = registry.versions(args.name)
    if not held:
        print(f"{args.name}: no published versions in {registry.where}", file=sys.stderr)
        return 2
    current = (registry.champion(args.name) or {}).get("version")
    print(f"{'':2}{'version':>8}  {'published (UTC)':<20}{'facts':>7}{'natural':>9}{'general':>9}  {'code':<14}flow run")
    for record in held:
        metrics, code = record.get("metrics", {}), record.get("code", {})
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.get("published_at", 0)))
        commit = (code.get("git_commit") or "")[:10] or code.get("code_hash", "")[:10]
        print(f"{'*' if record['version'] == current else ' ':2}{record['version']:>8}  {when:<20}"
              f"{_num(metrics.get('fact_accuracy')):>7}{_num(metrics.get('natural_fact_accuracy')):>9}"
              f"{_num(metrics.get('general_accuracy')):>9}  {commit:<14}{record.get('flow_run_id') or '-'}")
    moves = registry.history(args.name)
    if moves:
        last = moves[-1]
        print(f"champion: version {current} ({last['action']} by {last['by']}: {last['why']})")
    return 0


def cmd_promote(args) -> int:
    """Make VERSION the champion of NAME."""
    return _move(args, args.version, "promote")


def cmd_rollback(args) -> int:
    """Give NAME's champion back to the version before it (or --to VERSION)."""
    from loraflow.publishing.registry import RegistryError

    try:
        target = args.to if args.to is not None else registry_of(args.store).rollback_target(args.name)
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _move(args, target, "rollback")


def _move(args, number: int, action: str) -> int:
    from loraflow.publishing.registry import RegistryError

    registry = registry_of(args.store)
    try:
        record = registry.version(args.name, number)
        hub_tag = _move_hub_tag(record, f"{args.name} version {number}: champion ({action}: {args.why})")
        entry = registry.move_champion(args.name, number, action=action, why=args.why, by=args.by, hub_tag=hub_tag)
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except HubTagError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    alias = f"; Hub tag champion of {hub_tag['repo']} -> {hub_tag['commit'][:10]}" if hub_tag else ""
    if record.get("registered_version"):  # the tracking module imports transformers (~20 s on a busy 2-core CPU)
        from loraflow.tracking.mlflow_run import set_champion_alias

        alias += set_champion_alias(record)
    print(f"{args.name}: version {number} is the champion (was {entry['from_version']}; {action} by {entry['by']}: "
          f"{entry['why']}){alias}")
    return 0


class HubTagError(RuntimeError):
    """The Hub did not move its `champion` tag; the champion stays where it was everywhere."""


def _move_hub_tag(record: dict, message: str) -> dict | None:
    """The Hub's `champion` tag on the version's commit (None when it is not on the Hub); HubTagError naming the repo
    and what to do when the Hub refuses or cannot be reached."""
    if not record.get("hub_repo"):
        return None
    from loraflow.publishing.hub import move_champion_tag_to

    try:
        return move_champion_tag_to(record, message)
    except Exception as error:
        raise HubTagError(f"the Hub tag `champion` of {record['hub_repo']} did not move to {record.get('hub_commit')} "
                          f"({type(error).__name__}: {str(error)[:300]}); nothing moved -> check HF_TOKEN (or the "
                          f"Secret block publish.hf_token_secret names) and HF_ENDPOINT, and run the command again") from error


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
