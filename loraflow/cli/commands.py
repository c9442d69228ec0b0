"""`loraflow` command line: check a config, prepare data, run the whole pipeline, ask the model, list, promote and
roll back a model's published versions, put a config on a schedule."""

import argparse
import json
import os
import sys
from pathlib import Path

from loraflow.cli.models import add_model_commands
from loraflow.cli.schedule import add_schedule_commands
from loraflow.ops.automations import HEARTBEAT_SECONDS, SILENT_SECONDS
from loraflow.config.evaluate import HEADLINE_METRICS


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
    from loraflow.sources import check_source, source_locations

    # Each source checks itself: the file is there and readable, the database answers, the Hub dataset exists.
    problems = []
    for index, source in enumerate(config.sources):
        key = ".".join(["sources", str(index), *(l.key for l in source_locations(source, config.base_dir)[:1])])
        problems += [f"  {key}: {problem}" for problem in check_source(source, config.base_dir)]
    if not problems:
        problems += [f"  {problem}" for problem in configured_column_problems(config)]
    if problems:
        print(f"{args.config}: {len(problems)} problem(s)\n" + "\n".join(problems), file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(config.sources)} source(s), synthesize={config.synthesize.kind}, "
          f"template={config.format.template}, model={config.model.base})")
    return 0


def configured_column_problems(config) -> list[str]:
    """Columns the synthesizers are configured to read that a source lacks, where the source's columns can be known
    without ingesting it (csv, parquet)."""
    from loraflow.sources import source_columns, source_name
    from tasks.synthesize import column_problems

    known = [(source_name(source), source.synthesizer, columns) for source in config.sources
             if (columns := source_columns(source, config.base_dir)) is not None]
    return column_problems(config.synthesize, known)


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
    from loraflow.runs.summary import SUMMARY_FILE, RunSummary

    summary = RunSummary.model_validate(prepare_flow(config))
    print_stage_table(summary)
    print(Path(summary.run_dir) / SUMMARY_FILE)
    return 0


def print_stage_table(summary) -> None:
    """A short per-stage table of a RunSummary: rows in/out/quarantined, cached, seconds; then the top quarantine
    reasons."""
    print(f"{'stage':<28}{'in':>8}{'out':>8}{'quar.':>8}{'cached':>8}{'sec':>8}")
    for name, stage in summary.stages.items():
        print(f"{name:<28}{stage.rows_in:>8}{stage.rows_out:>8}{stage.rows_quarantined:>8}"
              f"{'yes' if stage.cached else 'no':>8}{stage.seconds:>8.2f}")
    if summary.untrained_rows:
        print(f"not trained, withheld for validation by tokenize.validation_fraction ({len(summary.untrained_rows)} "
              f"named; summary.json untrained_rows): {', '.join(summary.untrained_rows)}")
    reasons = {name: stage.quarantine_reasons for name, stage in summary.stages.items() if stage.quarantine_reasons}
    if reasons:
        print("quarantined rows, top reasons per stage (all of them: each stage's `quarantine` in summary.json):")
    for name, top in reasons.items():
        for reason in top:
            similar = " (and similar)" if reason["similar"] else ""
            print(f"  {name:<26}{reason['rows']:>6} x {reason['example'][:160]}{similar}")


def cmd_run(args) -> int:
    """Run the whole pipeline with Prefect's ephemeral API; print the summary path last."""
    config = load_or_report(args.config)
    if config is None:
        return 2
    from flows.finetune import finetune_flow
    from loraflow.runs.summary import SUMMARY_FILE, RunSummary

    state = finetune_flow(config, return_state=True)
    result = state.result(raise_on_failure=False)  # a refused run (Refused, or Failed by config) holds its summary
    if isinstance(result, BaseException):
        raise result
    summary = RunSummary.model_validate(result)
    print_stage_table(summary)
    print_eval_table(summary)
    print(Path(summary.run_dir) / SUMMARY_FILE)
    if not summary.publish.gate_passed:
        from loraflow.errors import GateFailed

        raise GateFailed(f"the evaluation gate refused the fine-tuned model (run state {state.name}), nothing was "
                         f"published: {'; '.join(summary.publish.gate_reasons)} -> improve the data or training, "
                         f"or change eval.gate in the config (re-decided without re-evaluating); ask the candidate with "
                         f"`loraflow ask {summary.run_dir} QUESTION`")
    return 0


def print_eval_table(summary) -> None:
    """Base vs fine-tuned on the main metrics (of a RunSummary), the gate and where the model went."""
    base, tuned = summary.eval.base, summary.eval.finetuned
    print(f"\n{'metric':<24}{'base':>10}{'fine-tuned':>12}")
    for metric in HEADLINE_METRICS:
        print(f"{metric:<24}{_num(base.get(metric)):>10}{_num(tuned.get(metric)):>12}")
    # Fact accuracy per question kind (any synthesizer that records facts), trained and held-out phrasings.
    for key, phrasings in (("fact_accuracy_by_kind", "trained"), ("heldout_fact_accuracy_by_kind", "held-out"),
                           ("false_refusal_rate_by_kind", "refused")):
        for kind in tuned.get(key, {}):
            metric = f"  {phrasings}[{kind}]"
            print(f"{metric:<24}{_num(base.get(key, {}).get(kind)):>10}{_num(tuned[key][kind]):>12}")
    publish = summary.publish
    print(f"gate: {'passed' if publish.gate_passed else 'FAILED'}; "
          f"model: {publish.run_model_link or publish.model_dir or 'not published'}")


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def cmd_ask(args) -> int:
    """Answer a question with the model a run published (streamed), or with the candidate its gate refused."""
    from loraflow.runs.summary import SUMMARY_FILE, RunSummary
    from loraflow.runtime.run_folder import published_model_dir

    if args.store:  # a model name: its champion
        from loraflow.cli.models import champion_model_dir
        from loraflow.publishing.registry import RegistryError

        try:
            return _answer(champion_model_dir(args.store, args.run_dir), args)
        except RegistryError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    run_dir = Path(args.run_dir)
    if not (run_dir / SUMMARY_FILE).exists() and not (run_dir / "config.json").exists():
        print(f"{run_dir / SUMMARY_FILE}: not found; pass the run folder that `loraflow run` printed", file=sys.stderr)
        return 2
    model_dir, adapter_dir, system_prompt = published_model_dir(run_dir), None, None
    if model_dir is None and (run_dir / SUMMARY_FILE).exists():  # no `model` link or model.txt: what the summary says
        summary = RunSummary.read(run_dir)
        publish, candidate = summary.publish, summary.candidate
        model_dir = Path(publish.model_dir) if publish and publish.model_dir else None
        if model_dir is None and candidate and publish and not publish.gate_passed:  # the refused candidate, unmerged
            model_dir, adapter_dir, system_prompt = candidate.base_model_dir, candidate.adapter_dir, candidate.system_prompt
            failures = [reason for reason in publish.gate_reasons if reason.startswith("FAIL")]
            print(f"note: this is the candidate the gate refused, NOT a published model ({'; '.join(failures)}); "
                  f"answering from its adapter {adapter_dir}", file=sys.stderr)
    if model_dir is None:
        print(f"{args.run_dir}: this run published no model and has no candidate (it stopped before training)", file=sys.stderr)
        return 2
    return _answer(model_dir, args, adapter_dir=adapter_dir, system_prompt=system_prompt)


def _answer(model_dir: Path, args, adapter_dir=None, system_prompt=None) -> int:
    from loraflow.modeling.inference import ask

    for piece in ask(model_dir, args.question, stream=True, max_new_tokens=args.max_new_tokens, system_prompt=system_prompt,
                     adapter_dir=adapter_dir):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_server(args) -> int:
    """Start a local Prefect server + process worker, deploy prefect.yaml, run until Ctrl-C / SIGTERM."""
    import signal
    import time

    from loraflow.ops.server import LocalPrefect, client_host, exposure_problem, record_api_url, restore_api_url

    problem = exposure_problem(args.host, os.environ)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    local = LocalPrefect(port=args.port, host=args.host, database_url=args.database_url)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with local:
        local.ensure_pools()
        local.ensure_crash_detection()
        if args.deploy:
            local.prefect("deploy", "--all")
        local.start_worker()
        previous_url = record_api_url(local.api_url)  # `prefect ...` in another shell now talks to this server
        print(f"Prefect UI: http://{client_host(args.host)}:{args.port}  (API {local.api_url}); worker on pool loraflow-cpu. Ctrl-C stops both.")
        print(f"PREFECT_API_URL={local.api_url} is set in your Prefect profile until this stops, so `prefect` and "
              f"`loraflow schedule` in another shell use this server (elsewhere: export PREFECT_API_URL={local.api_url})")
        try:
            while not stop:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            restore_api_url(previous_url)
    print("stopped")
    return 0


def cmd_notify(args) -> int:
    """Create the failure-notification automation on the server PREFECT_API_URL points at."""
    from loraflow.ops.automations import ensure_failure_notification

    print(f"automation {ensure_failure_notification(args.webhook_url)}: failed runs are posted to {args.webhook_url}")
    return 0


def cmd_detect_crashed(args) -> int:
    """Create the crash-detection automation on the server PREFECT_API_URL points at."""
    from loraflow.ops.automations import ensure_crash_detection

    if args.silent_seconds <= HEARTBEAT_SECONDS:
        print(f"error: --silent-seconds {args.silent_seconds} would mark live runs Crashed: their heartbeats are "
              f"{HEARTBEAT_SECONDS} s apart; give more than {HEARTBEAT_SECONDS}", file=sys.stderr)
        return 2
    print(f"automation {ensure_crash_detection(args.silent_seconds)}: a run silent for {args.silent_seconds} s is "
          f"marked Crashed (its worker must set PREFECT_FLOWS_HEARTBEAT_FREQUENCY={HEARTBEAT_SECONDS})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `loraflow` argument parser: one subcommand per job, every argument with its help."""
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show every log line and traceback on the console (they always go to the run's log file)")
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = "the run's YAML config (see `loraflow schema`; relative paths in it start at its folder)"

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    command("check", cmd_check, "validate a config file and the paths it names").add_argument("config", help=config_help)
    command("schema", cmd_schema, "print the config JSON schema (every key, its description and default)")
    command("prepare", cmd_prepare, "run the data half (sources -> verified tokens); prints the summary path last") \
        .add_argument("config", help=config_help)
    command("run", cmd_run, "run the whole pipeline (prepare, train, evaluate, publish); prints the summary path last") \
        .add_argument("config", help=config_help)
    ask = command("ask", cmd_ask, "ask the model a run published, or the candidate its gate refused (the answer is streamed)")
    ask.add_argument("run_dir", help="the run folder `loraflow run` printed (summary.json, model/), a model folder, or "
                                     "with --store a model name (its champion answers)")
    ask.add_argument("question", help="the question, quoted")
    ask.add_argument("--store", default=None, help="read RUN_DIR as a model name of this store's registry and ask its "
                                                   "champion (from an s3:// store, fetched when another host published it)")
    ask.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default: 256)")
    notify = command("notify-on-failure", cmd_notify, "post failed runs to a webhook (Prefect automation)")
    notify.add_argument("webhook_url", help="URL that receives a POST for every failed or crashed flow run")
    crashed = command("detect-crashed-runs", cmd_detect_crashed,
                      "mark runs whose process died (no heartbeat for 90 s) Crashed (Prefect automation)")
    crashed.add_argument("--silent-seconds", type=int, default=SILENT_SECONDS,
                         help=f"seconds without a heartbeat after which a run is marked Crashed (default: {SILENT_SECONDS}; "
                              f"more than the {HEARTBEAT_SECONDS} s between a run's heartbeats)")
    add_model_commands(command)
    add_schedule_commands(command)
    server = command("server", cmd_server, "start a local Prefect server + worker (and deploy prefect.yaml)")
    server.add_argument("--port", type=int, default=4200, help="port of the server's API and UI (default: 4200)")
    server.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: 127.0.0.1); any other needs PREFECT_SERVER_API_AUTH_STRING set")
    server.add_argument("--database-url", default=None,
                        help="server database; default SQLite in PREFECT_HOME, e.g. postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect")
    server.add_argument("--no-deploy", dest="deploy", action="store_false", help="skip `prefect deploy --all`")
    return parser


# Commands that run flows: their user errors (user_error_types) are printed once (see loraflow/errors.py).
REPORTED = ("prepare", "run")


def main(argv=None) -> int:
    """Entry point of the `loraflow` console script."""
    quiet_offline_prefect()
    args = build_parser().parse_args(argv)
    if args.command not in REPORTED or args.debug:
        return args.handler(args)
    return run_reported(args)


def run_reported(args) -> int:
    """Run a flow command; a user error (config, source, contract, gate) prints once with its fix, exit 1."""
    import logging

    import prefect  # noqa: F401 - configures Prefect's console logging, which the filter goes on

    from loraflow.errors import log_file, plain_message, quiet_console, record_traceback

    types = user_error_types()
    quiet = quiet_console(types)
    handler = log_file(log_folder(args.config), args.command)
    try:
        return args.handler(args)
    except types as error:
        record_traceback(handler, error)
        print(plain_message(error, handler.baseFilename), file=sys.stderr)
        return 1
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        for console in logging.getLogger().handlers:
            console.removeFilter(quiet)


def user_error_types() -> tuple[type, ...]:
    """The exception types whose message already says what is wrong and how to fix it.

    Listed here, in the entry point, because the stages define most of them and the library never imports a stage.
    """
    from data_contracts.base import ContractViolation
    from loraflow.config.pipeline import ConfigError
    from loraflow.errors import GateFailed
    from loraflow.modeling.base_model import ModelSourceError
    from tasks.preflight import PreflightError
    from loraflow.sources.common import SourceError
    from tasks.synthesize import SynthesizeError
    from tasks.tokenize import TruncationError

    return (ConfigError, SourceError, SynthesizeError, ContractViolation, TruncationError, PreflightError,
            ModelSourceError, GateFailed)


def log_folder(config_path: str) -> Path:
    """Where a command's log file goes: <runs_dir>/<name>/logs/, or loraflow's cache when the config is invalid."""
    from loraflow.config.pipeline import ConfigError, load_config
    from loraflow.runtime.cache_folder import cache_dir

    try:
        config = load_config(config_path)
    except ConfigError:
        return cache_dir() / "logs"
    return config.runs_root() / config.name / "logs"


if __name__ == "__main__":
    sys.exit(main())
