"""Config of the run's cost figure: a price per device-hour (the machine the stages run on)."""

from pydantic import Field

from loraflow.config.base import StrictModel


class CostConfig(StrictModel):
    """What one device-hour costs, so a run can say what it cost (summary, artifact, model card, MLflow)."""

    price_per_device_hour: float | None = Field(
        None, ge=0,
        description="Price of one device (GPU, or the CPU machine) for one hour, e.g. 2.49 for a rented H100; None: the "
        "run reports its device-seconds only.",
    )
    currency: str = Field("USD", max_length=8, description="Currency of price_per_device_hour, as shown beside the cost.")
