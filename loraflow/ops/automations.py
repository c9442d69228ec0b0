"""Prefect automations of a loraflow server, each created (or replaced) on the server PREFECT_API_URL points at.

- `loraflow notify-on-failure URL`: a webhook (Slack, Teams, a pager...) hears of every failed or crashed run, and of
  every run whose candidate model the gate refused (state Completed(name="Refused"), loraflow.ops.refusal).
- `loraflow detect-crashed-runs` (`loraflow server` creates it): a run whose process died with its worker (OOM
  killer, preempted VM, redeployed worker) stops sending heartbeats; it is marked Crashed instead of staying
  Running forever (Prefect's own recipe: docs.prefect.io/v3/advanced/detect-zombie-flows).
"""

from datetime import timedelta

from loraflow.ops.refusal import REFUSED_STATE_NAME

AUTOMATION_NAME = "loraflow-run-failed"
BLOCK_NAME = "loraflow-failure-webhook"
CRASH_AUTOMATION_NAME = "loraflow-crash-silent-runs"
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of every run a loraflow worker starts (Prefect's minimum)
SILENT_SECONDS = 90     # no heartbeat (nor end) for this long after the last one: the run's process is gone


def replace_automation(automation) -> str:
    """Create `automation` on the server, deleting an earlier one of the same name first; return its id."""
    from prefect.automations import Automation

    try:
        Automation.read(name=automation.name).delete()
    except ValueError:
        pass
    return str(automation.create().id)


def ensure_failure_notification(webhook_url: str) -> str:
    """Create the webhook block and the automation (replacing earlier ones); return the automation id."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url=webhook_url, allow_private_urls=True,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    block_id = block.save(BLOCK_NAME, overwrite=True)
    return replace_automation(Automation(
        name=AUTOMATION_NAME,
        description="Notify when a loraflow flow run (scheduled or triggered) fails, crashes or has its model refused.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed", f"prefect.flow-run.{REFUSED_STATE_NAME}"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(seconds=0),
        ),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="loraflow: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
            body="Flow run {{ flow_run.name }} ({{ flow_run.id }}) of deployment {{ deployment.name }} ended "
                 "{{ flow_run.state.name }}: {{ flow_run.state.message }}",
        )],
    ))


def ensure_crash_detection(silent_seconds: int = SILENT_SECONDS) -> str:
    """Create the automation that marks a Running flow run Crashed once it has sent no heartbeat for
    `silent_seconds` (replacing an earlier one); return its id. Runs need PREFECT_FLOWS_HEARTBEAT_FREQUENCY set."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return replace_automation(Automation(
        name=CRASH_AUTOMATION_NAME,
        description=f"Mark a flow run Crashed when it sends no heartbeat for {silent_seconds} s (its process died).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent_seconds),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {silent_seconds} s: the run's process died (worker killed, machine lost). "
                    "Re-run it: finished stages are cached and training resumes from its last checkpoint.",
        )],
    ))
