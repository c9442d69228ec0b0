"""`loraflow schedule CONFIG --cron ... | --on-data` and `loraflow schedules`: your own config on a clock, or retrained
when its data lands, on the server that PREFECT_API_URL points at (`loraflow server` records it).

`--on-data` adds a deployment trigger: a run starts when any of the config's sources is materialized as a Prefect
asset (an upstream ETL flow's `@materialize("file:///data/catalog.csv")`; keys: loraflow.ops.assets.source_asset_key).

The deployment runs the `finetune` flow of this checkout on the `loraflow-cpu` pool with the config as its typed
parameter. Every relative folder in the config (store, runs_dir, and the sources through base_dir) is made absolute
against the config file's folder first: a worker runs from its own working directory, and relative paths would
land there. Scheduling the same config again updates its deployment (`<name>-schedule`) in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCHEDULE_TAG = "loraflow-schedule"


def add_schedule_commands(command) -> None:
    """Register `schedule` and `schedules` with `command(name, handler, help)` (loraflow.cli.commands.build_parser)."""
    schedule = command("schedule", cmd_schedule, "put a config on a cron schedule (creates or updates its deployment)")
    schedule.add_argument("config", help="the run's YAML config; its relative paths are resolved against its folder")
    schedule.add_argument("--cron", default=None, help='cron expression, quoted, e.g. "0 3 * * *"')
    schedule.add_argument("--on-data", action="store_true",
                          help="also run when an upstream flow materializes one of the config's sources as a Prefect asset")
    schedule.add_argument("--timezone", default="UTC", help="time zone of the cron expression (default: UTC)")
    schedule.add_argument("--pool", default="loraflow-cpu", help="work pool whose worker runs it (default: loraflow-cpu)")
    command("schedules", cmd_schedules, "list the configs put on a schedule with `loraflow schedule`")


def scheduled_parameters(config) -> dict:
    """The config as a deployment parameter, every relative folder made absolute against its base_dir (the config
    file's folder), so the worker's working directory changes nothing."""
    data = config.model_dump(mode="json")
    base = Path(config.base_dir).expanduser().resolve()
    data["base_dir"] = str(base)
    for key in ("store", "runs_dir"):
        if "://" not in data[key] and not Path(data[key]).expanduser().is_absolute():
            data[key] = str((base / data[key]).resolve())
    return data


def cmd_schedule(args) -> int:
    """Create or update the deployment `<name>-schedule` of the finetune flow with the config and a cron schedule."""
    from loraflow.cli.commands import load_or_report
    from loraflow.ops.server import REPO

    if not args.cron and not args.on_data:
        print("error: give --cron EXPR, --on-data, or both", file=sys.stderr)
        return 2
    config = load_or_report(args.config)
    if config is None:
        return 2
    from prefect import Flow
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron

    from flows.finetune import source_asset_keys

    keys = source_asset_keys(config)
    flow = Flow.from_source(LocalStorage(path=str(REPO)), entrypoint="flows/finetune.py:finetune_flow")
    deployment_id = flow.deploy(
        name=f"{config.name}-schedule", work_pool_name=args.pool, tags=[SCHEDULE_TAG],
        schedules=[Cron(args.cron, timezone=args.timezone)] if args.cron else [],
        triggers=[data_trigger(config.name, keys)] if args.on_data else [],
        parameters={"config": scheduled_parameters(config)}, print_next_steps=False,
        description=f"loraflow schedule {Path(args.config).resolve()}" + (f" --cron '{args.cron}'" if args.cron else "")
        + (" --on-data" if args.on_data else ""),
    )
    when = " and ".join(([f"{args.cron} ({args.timezone})"] if args.cron else [])
                        + ([f"when {', '.join(keys)} is materialized"] if args.on_data else []))
    print(f"deployment finetune/{config.name}-schedule ({deployment_id}): {when}; pool {args.pool}; "
          f"store {scheduled_parameters(config)['store']}")
    return 0


def data_trigger(name: str, keys: list[str]):
    """A deployment trigger: one run each time an upstream materializes one of `keys`."""
    from prefect.events import DeploymentEventTrigger

    from loraflow.ops.assets import MATERIALIZED_EVENT

    return DeploymentEventTrigger(name=f"{name}: its data landed", expect={MATERIALIZED_EVENT},
                                  match={"prefect.resource.id": keys})


def cmd_schedules(args) -> int:
    """Print every deployment `loraflow schedule` made: name, cron, time zone, active, next runs' config name."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[SCHEDULE_TAG])))
    if not deployments:
        print("no schedules: `loraflow schedule CONFIG --cron ...` makes one", file=sys.stderr)
        return 0
    for deployment in sorted(deployments, key=lambda d: d.name):
        for item in deployment.schedules or [None]:
            cron = getattr(item.schedule, "cron", "-") if item else "-"
            timezone = getattr(item.schedule, "timezone", "") if item else ""
            active = "active" if item and item.active else "paused"
            print(f"finetune/{deployment.name:<30} {cron:<16} {timezone or 'UTC':<14} {active:<7} {deployment.description or ''}")
    return 0
