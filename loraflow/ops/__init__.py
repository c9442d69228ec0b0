"""Operating a loraflow installation: the local Prefect server with its worker, and its automations."""
