"""Errors a user can fix (config, source, contract, gate): printed once, plainly, with the fix.

A failing stage used to print its message about ten times and three tracebacks (the task's, the flow's and
Python's). The CLI keeps Prefect's console quiet about these errors (they still reach the API and the log
file), prints the message once, writes the traceback to a log file and exits non-zero; `--debug` shows
everything as before. Errors that are bugs (anything else) are not filtered.
"""

import logging
import traceback
from datetime import datetime, timezone
from pathlib import Path


class GateFailed(RuntimeError):
    """The evaluation gate refused the fine-tuned model; the message lists the gate's reasons."""


# The gate's reasons of a refused model start with this (loraflow.evaluation.metrics.decide_gate).
GATE_FAILURE = "FAIL: "


class QuietUserErrors(logging.Filter):
    """A console-handler filter: drops records that carry or repeat a user error (its class name in Prefect's
    'Finished in state Failed(...SourceError: ...)' lines, or a refused gate's reasons, which the evaluate task and
    the flow log and the CLI prints once at the end); everything else passes."""

    def __init__(self, types: tuple[type, ...]):
        super().__init__()
        self.types = types
        self.names = tuple(f"{kind.__name__}{mark}" for kind in types for mark in (":", "("))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.types):
            return False
        if record.levelno < logging.INFO:
            return True
        message = record.getMessage() if record.args else str(record.msg)
        if "gate" in message and GATE_FAILURE in message:
            return False
        return not any(name in message for name in self.names)


def quiet_console(types: tuple[type, ...]) -> QuietUserErrors:
    """Add the filter to every console handler of the root logger (Prefect's included); returns it."""
    quiet = QuietUserErrors(types)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(quiet)
    return quiet


def log_file(folder: Path, command: str) -> logging.FileHandler:
    """A file handler on the root logger for this command's whole log, tracebacks included."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    handler = logging.FileHandler(folder / f"{stamp}-{command}.log", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def record_traceback(handler: logging.FileHandler, error: BaseException) -> None:
    """Append the error's traceback to the log file."""
    with open(handler.baseFilename, "a", encoding="utf-8") as stream:
        stream.write("".join(traceback.format_exception(error)))


def plain_message(error: BaseException, log_path: str) -> str:
    """What the user sees: the error's own message (it names the fix), then where the traceback is."""
    return f"error: {error}\n(the full log with the traceback: {log_path}; run with --debug to see it here)"
