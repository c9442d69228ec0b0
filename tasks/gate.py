"""gate: decide whether the candidate may be published, on the evaluation's metrics (seconds; no model, no answers).

The evaluation (tasks/evaluate.py) is keyed without eval.gate, so a changed threshold re-runs only this step on the
cached metrics. The decision itself is the pure function loraflow.evaluation.gate.decide_gate: thresholds, then the
candidate against the champion on every question metric both were asked, each with its sample size.
"""

from __future__ import annotations

from loraflow.config.evaluate import GateConfig
from loraflow.evaluation.gate import GateDecision, decide_gate
from loraflow.evaluation.report import render_gate
from loraflow.tracking.mlflow_run import log_best_effort
from loraflow.tracking.report_to import TrackingRun
from tasks.evaluate import EvalResult


def gate_candidate(evaluation: EvalResult, gate_config: GateConfig) -> GateDecision:
    """The gate's decision on an evaluation's summaries (base, candidate, champion) and general regressions."""
    return decide_gate(evaluation.base, evaluation.finetuned, gate_config, evaluation.general_regressions,
                       previous=evaluation.previous)


# ---- Prefect wrapper -----------------------------------------------------------------------------------

try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect
    task = None

if task is not None:

    @task(name="gate")  # not cached: it is cheaper to decide than to look a decision up
    def gate_task(evaluation: EvalResult, gate_config: GateConfig, tracking: TrackingRun | None = None) -> GateDecision:
        """Prefect task around `gate_candidate`: the decision as a markdown artifact, one log line, and
        eval.gate_passed on training's MLflow run (best effort)."""
        from prefect import get_run_logger
        from prefect.artifacts import create_markdown_artifact

        logger = get_run_logger()
        decision = gate_candidate(evaluation, gate_config)
        refused_state = "Failed" if gate_config.fail_on_refusal else "Completed(name='Refused')"
        create_markdown_artifact(render_gate(decision, refused_state), key="gate", description="publish gate")
        logger.info("gate: %s — %s", "passed" if decision.passed else "REFUSED", "; ".join(decision.reasons))
        log_best_effort(tracking, "gate", logger, metrics={"eval.gate_passed": float(decision.passed)})
        return decision
