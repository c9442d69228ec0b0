"""A Prefect automation that notifies a webhook (Slack, Teams, a pager...) when a loraflow run fails.

`loraflow notify-on-failure URL` creates (or replaces) it on the server PREFECT_API_URL points at.
"""

from datetime import timedelta

AUTOMATION_NAME = "loraflow-run-failed"
BLOCK_NAME = "loraflow-failure-webhook"


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
    try:
        Automation.read(name=AUTOMATION_NAME).delete()
    except ValueError:
        pass
    automation = Automation(
        name=AUTOMATION_NAME,
        description="Notify when a loraflow flow run (scheduled or triggered) fails or crashes.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
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
    ).create()
    return str(automation.id)
