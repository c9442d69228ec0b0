"""`loraflow` command line: check a config, prepare data, run the whole pipeline, ask the model."""

import argparse
import json
import os
import sys
from pathlib import Path


def quiet_offline_prefect() -> None:
    """Prefect defaults for offline use (no analytics DNS lookups), unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # The ephemeral API server can take longer than Prefect's 20 s default to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def load_or_report(path: str):
    """The validated config, or None after printing every problem (key and fix) to stderr."""
    from loraflow.config.pipeline import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None


def cmd_check(args) -> int:
    """Validate a config and the things it points to; print every problem with its key and fix."""
    config = load_or_report(args.config)
    if config is None:
        return 2
    problems = []
    for index, source in enumerate(config.sources):
        path = getattr(source, "path", None)
        if path and not config.resolve(path).exists():
            problems.append(f"  sources.{index}.path: {config.resolve(path)} does not exist -> fix the path (relative paths start at the config's folder)")
    if problems:
        print(f"{args.config}: {len(problems)} problem(s)\n" + "\n".join(problems), file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(config.sources)} source(s), synthesize={config.synthesize.kind}, "
          f"template={config.format.template}, model={config.model.base})")
    return 0


def cmd_schema(args) -> int:
    """Print the config's JSON schema (every key with its description and default)."""
    from loraflow.config.pipeline import PipelineConfig

    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
    return 0


def cmd_prepare(args) -> int:
    """Run the data half with Prefect's ephemeral API; print the summary path last."""
    config = load_or_report(args.config)
    if config is None:
        return 2
    from flows.prepare import prepare_flow

    summary = prepare_flow(config)
    print_stage_table(summary)
    print(Path(summary["run_dir"]) / "summary.json")
    return 0


def print_stage_table(summary: dict) -> None:
    """A short per-stage table: rows in/out/quarantined, cached, seconds."""
    print(f"{'stage':<28}{'in':>8}{'out':>8}{'quar.':>8}{'cached':>8}{'sec':>8}")
    for name, stage in summary["stages"].items():
        print(f"{name:<28}{stage['rows_in']:>8}{stage['rows_out']:>8}{stage['rows_quarantined']:>8}"
              f"{'yes' if stage['cached'] else 'no':>8}{stage['seconds']:>8.2f}")


def cmd_run(args) -> int:
    """Run the whole pipeline with Prefect's ephemeral API; print the summary path last."""
    config = load_or_report(args.config)
    if config is None:
        return 2
    from flows.finetune import finetune_flow

    summary = finetune_flow(config)
    print_stage_table(summary)
    print_eval_table(summary)
    print(Path(summary["run_dir"]) / "summary.json")
    return 0


def print_eval_table(summary: dict) -> None:
    """Base vs fine-tuned on the main metrics, the gate and where the model went."""
    base, tuned = summary["eval"]["base"], summary["eval"]["finetuned"]
    print(f"\n{'metric':<24}{'base':>10}{'fine-tuned':>12}")
    for metric in ("fact_accuracy", "heldout_fact_accuracy", "rouge_l", "stop_rate", "eval_loss"):
        print(f"{metric:<24}{_num(base.get(metric)):>10}{_num(tuned.get(metric)):>12}")
    publish = summary["publish"]
    print(f"gate: {'passed' if publish['gate_passed'] else 'FAILED'}; "
          f"model: {publish.get('model_dir', 'not published')}")


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def cmd_ask(args) -> int:
    """Answer a question with the model a run published (streamed)."""
    summary_path = Path(args.run_dir) / "summary.json"
    if not summary_path.exists():
        print(f"{summary_path}: not found; pass the run folder that `loraflow run` printed", file=sys.stderr)
        return 2
    model_dir = json.loads(summary_path.read_text()).get("publish", {}).get("model_dir")
    if not model_dir:
        print(f"{args.run_dir}: this run published no model (gate failed or not run)", file=sys.stderr)
        return 2
    from loraflow.inference import ask

    for piece in ask(model_dir, args.question, stream=True, max_new_tokens=args.max_new_tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_server(args) -> int:
    """Start a local Prefect server + process worker, deploy prefect.yaml, run until Ctrl-C / SIGTERM."""
    import signal
    import time

    from loraflow.server import LocalPrefect

    local = LocalPrefect(port=args.port, database_url=args.database_url)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with local:
        local.ensure_pools()
        if args.deploy:
            local.prefect("deploy", "--all")
        local.start_worker()
        print(f"Prefect UI: http://127.0.0.1:{args.port}  (API {local.api_url}); worker on pool loraflow-cpu. Ctrl-C stops both.")
        try:
            while not stop:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    print("stopped")
    return 0


def cmd_notify(args) -> int:
    """Create the failure-notification automation on the server PREFECT_API_URL points at."""
    from loraflow.automations import ensure_failure_notification

    print(f"automation {ensure_failure_notification(args.webhook_url)}: failed runs are posted to {args.webhook_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("config")
    check.set_defaults(handler=cmd_check)
    schema = commands.add_parser("schema", help="print the config JSON schema")
    schema.set_defaults(handler=cmd_schema)
    prepare = commands.add_parser("prepare", help="run the data half (sources -> verified tokens)")
    prepare.add_argument("config")
    prepare.set_defaults(handler=cmd_prepare)
    run = commands.add_parser("run", help="run the whole pipeline (prepare, train, evaluate, publish)")
    run.add_argument("config")
    run.set_defaults(handler=cmd_run)
    ask = commands.add_parser("ask", help="ask the model a run published")
    ask.add_argument("run_dir")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.set_defaults(handler=cmd_ask)
    notify = commands.add_parser("notify-on-failure", help="post failed runs to a webhook (Prefect automation)")
    notify.add_argument("webhook_url")
    notify.set_defaults(handler=cmd_notify)
    server = commands.add_parser("server", help="start a local Prefect server + worker (and deploy prefect.yaml)")
    server.add_argument("--port", type=int, default=4200)
    server.add_argument("--database-url", default=None, help="e.g. postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect")
    server.add_argument("--no-deploy", dest="deploy", action="store_false", help="skip `prefect deploy --all`")
    server.set_defaults(handler=cmd_server)
    return parser


def main(argv=None) -> int:
    """Entry point of the `loraflow` console script."""
    quiet_offline_prefect()
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
