"""A run's cost: device-seconds per stage (the seconds this run spent on it times the devices it held) and, with a
price per device-hour (cost.price_per_device_hour), what they cost. A cached stage costs the seconds spent looking
its result up, which is the point: an unchanged nightly run costs almost nothing."""

from __future__ import annotations

import time
from contextlib import contextmanager

from loraflow.config.cost import CostConfig


@contextmanager
def timed(stage_seconds: dict[str, float], stage: str):
    """Add the seconds the block takes to `stage_seconds[stage]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - started


def run_cost(stage_seconds: dict[str, float], devices: dict[str, int], cost_config: CostConfig) -> dict:
    """{"device_seconds": {stage: s}, "total_device_seconds", "device_hours", "price_per_device_hour", "currency",
    "cost"}; `devices` gives a stage's device count where it is not 1 (distributed training)."""
    per_stage = {stage: round(seconds * devices.get(stage, 1), 3) for stage, seconds in stage_seconds.items()}
    total = round(sum(per_stage.values()), 3)
    price = cost_config.price_per_device_hour
    return {"device_seconds": per_stage, "total_device_seconds": total, "device_hours": round(total / 3600, 6),
            "price_per_device_hour": price, "currency": cost_config.currency,
            "cost": None if price is None else round(total / 3600 * price, 6)}


def cost_line(cost: dict) -> str:
    """One sentence for the summary artifact and the model card."""
    spent = f"{cost['total_device_seconds']:.1f} device-seconds ({cost['device_hours']:.4f} device-hours)"
    if cost["cost"] is None:
        return f"Cost: {spent}; set cost.price_per_device_hour for a price."
    return (f"Cost: {cost['cost']:.4f} {cost['currency']} = {spent} at {cost['price_per_device_hour']:g} "
            f"{cost['currency']} per device-hour.")
