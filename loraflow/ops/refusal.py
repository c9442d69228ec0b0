"""A refused candidate, made impossible to miss: the flow run's end state and a Prefect event with the reasons.

By default a refused run ends `Completed(name="Refused")` (the run did its job: it decided not to publish); with
eval.gate.fail_on_refusal it ends `Failed`. Either way it emits `loraflow.model.refused` (resource
`loraflow.model.<name>`, payload: the reasons, the run folder, the candidate adapter), and the
`notify-on-failure` automation (loraflow.ops.automations) posts refused runs to its webhook too.
"""

from __future__ import annotations

REFUSED_EVENT = "loraflow.model.refused"
REFUSED_STATE_NAME = "Refused"


def refusal_message(model_name: str, failures: list[str], run_dir: str) -> str:
    """One line: which model was refused, why, and how to look at the candidate."""
    return (f"the gate refused the candidate for {model_name!r}, nothing was published: {'; '.join(failures)}. "
            f"Ask the candidate with `loraflow ask {run_dir} QUESTION`; change eval.gate in the config to re-decide "
            "(the evaluation is cached)")


def emit_refusal(model_name: str, failures: list[str], reasons: list[str], run_dir: str, adapter_dir: str) -> None:
    """Emit `loraflow.model.refused` for `model_name` (inside a flow run, Prefect relates the event to the run)."""
    from prefect.events import emit_event

    emit_event(
        event=REFUSED_EVENT,
        resource={"prefect.resource.id": f"loraflow.model.{model_name}", "prefect.resource.name": model_name},
        payload={"failures": failures, "reasons": reasons, "run_dir": run_dir, "candidate_adapter_dir": adapter_dir},
    )


def refused_state(summary: dict, message: str, fail: bool):
    """The state a refused flow run returns: Completed(name="Refused"), or Failed when `fail`; its data is the run
    summary either way (so `loraflow run` still prints it)."""
    from prefect.states import Completed, Failed

    return Failed(message=message, data=summary) if fail else Completed(name=REFUSED_STATE_NAME, message=message, data=summary)
