"""Pipeline stages, one module each: a pure function that does the work plus a thin Prefect task."""
