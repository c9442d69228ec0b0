"""A run's cost: device-seconds per stage times devices, priced per device-hour (loraflow.runtime.run_cost)."""

import pytest

from loraflow.config.cost import CostConfig
from loraflow.runtime.run_cost import cost_line, run_cost


def test_device_seconds_and_price():
    cost = run_cost({"prepare": 10.0, "train": 300.0, "evaluate": 50.0}, {"train": 4}, CostConfig(price_per_device_hour=2.0))
    assert cost["device_seconds"] == {"prepare": 10.0, "train": 1200.0, "evaluate": 50.0}
    assert cost["total_device_seconds"] == 1260.0 and cost["cost"] == pytest.approx(0.7)
    assert cost_line(cost) == "Cost: 0.7000 USD = 1260.0 device-seconds (0.3500 device-hours) at 2 USD per device-hour."


def test_without_a_price_only_the_device_seconds():
    cost = run_cost({"train": 36.0}, {}, CostConfig())
    assert cost["cost"] is None and cost["device_hours"] == 0.01
    assert cost_line(cost) == "Cost: 36.0 device-seconds (0.0100 device-hours); set cost.price_per_device_hour for a price."
