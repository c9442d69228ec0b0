"""What a pipeline run records: its typed summary.json (summary.py)."""
