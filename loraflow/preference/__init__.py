"""Preference data: chosen/rejected pairs built from the synthesized rows (loraflow.preference.pairs)."""
