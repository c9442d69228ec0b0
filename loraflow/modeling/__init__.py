"""The model at run time: where the base model comes from, its precision, prompt encoding, inference."""
