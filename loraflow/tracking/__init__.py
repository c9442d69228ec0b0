"""Experiment tracking: transformers' `report_to` integrations and the pipeline's MLflow run."""
