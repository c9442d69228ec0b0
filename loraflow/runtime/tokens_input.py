"""The TOKENS artifact as the model stages (train, evaluate) read it: the frame and the hash that names it.

    frame, data_sha = load_tokens(tokens, store)   # an ArtifactRef (verified against its manifest) or a DataFrame

A DataFrame (tests, scripts, the launcher's Parquet copy) is named by the sha256 of its id, input_ids, labels and
split columns; an artifact by its manifest's sha256.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore, table_bytes


def load_tokens(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None) -> tuple[pd.DataFrame, str]:
    """The tokens frame and the hash that identifies it (the artifact's sha256, or that of the frame)."""
    if isinstance(tokens, pd.DataFrame):
        return tokens, hashlib.sha256(table_bytes(tokens[["id", "input_ids", "labels", "split"]])).hexdigest()
    from data_contracts import TOKENS
    from loraflow.runtime.stage_output import read_input

    store = store or store_for(tokens)
    return read_input(store, tokens, TOKENS), tokens.sha256


def store_for(ref: ArtifactRef) -> ArtifactStore:
    """The store an artifact lives in, from its uri (`<root>/artifacts/<stage>/<sha>.parquet`)."""
    marker = "/artifacts/"
    if marker not in ref.uri:
        raise ValueError(f"{ref.uri}: not inside an artifact store (no /artifacts/ in the path); pass store=")
    return ArtifactStore(ref.uri.rsplit(marker, 1)[0])
