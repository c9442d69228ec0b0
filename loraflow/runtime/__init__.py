"""Pipeline plumbing every stage shares: the artifact store, stage outputs, the stage task and its cache keys,
locks, shards, atomic files, I/O retries, the run folder."""
