"""The evaluate stage's rows read a batch at a time: the questions to ask and the rows to take the loss on.

    questions, loss_rows, loss_split = evaluation_inputs(tokens, store, eval_config)

The same questions as `metrics.evaluation_rows` on the whole frame: per set (trained, heldout, natural, unknown) one
row per distinct prompt (the first, in artifact order: 16-byte prompt digests across batches), the `max_questions`
first by sampling order (a hash of id and seed) kept as batches go by with the set's count, the quotas applied at the
end; the made-up titles of the unknown-title probes are then looked for in a second pass. The loss rows (split
validation, else heldout without the made-up titles' probes) are a memory-mapped Arrow table of input_ids and labels
(loraflow.runtime.tokens_input).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from loraflow.config.evaluate import EvalConfig
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.parquet_stream import DigestSet, digests16
from loraflow.runtime.tokens_input import open_tokens, store_for

SETS = ("trained", "heldout", "natural", "unknown")
IGNORE_INDEX = -100


class QuestionPool:
    """Per set: how many distinct prompts were seen, and the `keep` first rows by sampling order."""

    def __init__(self, keep: int, seed: int):
        self.keep, self.seed = keep, seed
        self.prompts = {name: DigestSet() for name in SETS}
        self.counts = dict.fromkeys(SETS, 0)
        self.best: dict[str, pd.DataFrame | None] = dict.fromkeys(SETS)

    def add(self, frame: pd.DataFrame) -> None:
        """Offer one batch of TOKENS rows (in artifact order)."""
        from loraflow.evaluation.metrics import question_sets

        for name, mask in question_sets(frame).items():
            rows = frame[mask]
            rows = rows[self.prompts[name].add_new(digests16(rows["prompt"].tolist()))]
            self.counts[name] += len(rows)
            order = rows["id"].map(lambda i: hashlib.sha256(f"{self.seed}:{i}".encode()).hexdigest())
            ranked = rows.assign(set=name, _order=order.values)
            kept = ranked if self.best[name] is None else pd.concat([self.best[name], ranked])
            self.best[name] = kept.sort_values("_order").head(self.keep)

    def chosen(self, max_questions: int) -> pd.DataFrame:
        """The questions, as `metrics.select_questions` chooses them from the whole frame."""
        from loraflow.evaluation.metrics import question_quotas

        quotas = question_quotas(self.counts, max_questions)
        parts = [self.best[name].head(quotas[name]) for name in SETS if self.best[name] is not None]
        return pd.concat(parts, ignore_index=True).drop(columns="_order") if parts else pd.DataFrame()


def known_titles(probe_titles: list[str], batches) -> set[str]:
    """The normalised titles (of `probe_titles`) that appear in some non-refusal row's prompt or reference."""
    from loraflow.evaluation.metrics import REFUSAL_KIND, normalise

    wanted, found = {normalise(t) for t in probe_titles if t}, set()
    for frame in batches:
        others = frame[frame["kind"] != REFUSAL_KIND]
        corpus = "\n".join(normalise(text) for text in pd.concat([others["prompt"], others["reference"]]).tolist())
        found |= {title for title in wanted - found if title in corpus}
    return found


def evaluation_inputs(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None, eval_config: EvalConfig,
                      batch_rows: int | None = None) -> tuple[pd.DataFrame, pa.Table, str]:
    """(questions, loss rows as an Arrow table of input_ids and labels, the loss rows' split) of a TOKENS artifact
    (read a batch at a time) or DataFrame; the same as `metrics.evaluation_rows` on the whole frame."""
    from loraflow.evaluation.metrics import fact_list

    batches = _batch_reader(tokens, store, batch_rows)
    pool = QuestionPool(eval_config.max_questions, eval_config.seed)
    for frame in batches():
        pool.add(frame)
    questions = pool.chosen(eval_config.max_questions)
    probe = questions["set"] == "unknown" if len(questions) else pd.Series(dtype=bool)
    if probe.any():
        from loraflow.evaluation.metrics import normalise

        titles = [next((fact["value"] for fact in fact_list(facts)), "") for facts in questions.loc[probe, "facts"]]
        known = known_titles(titles, batches())
        drop = questions.index[probe][[bool(t) and normalise(t) in known for t in titles]]
        questions = questions.drop(index=drop).reset_index(drop=True)
    for split in ("validation", "heldout"):
        loss_rows = loss_table(tokens, store, split)
        if loss_rows.num_rows:
            return questions, sample_table(loss_rows, eval_config.max_loss_rows, eval_config.seed), split
    return questions, loss_rows.select(["input_ids", "labels"]), "heldout"


def sample_table(rows: pa.Table, limit: int | None, seed: int = 0) -> pa.Table:
    """input_ids and labels of at most `limit` rows (all for None), chosen as `metrics.sample_rows` chooses them (a
    hash of id and seed), in their original order."""
    from loraflow.evaluation.metrics import sample_rows

    if limit is not None and rows.num_rows > limit:
        ids = pd.DataFrame({"id": rows.column("id").to_pylist()})
        rows = rows.take(sample_rows(ids, limit, seed).index.to_numpy())
    return rows.select(["input_ids", "labels"])


def loss_table(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None, split: str) -> pa.Table:
    """The id, input_ids and labels of `split`'s rows; of split heldout the trained rows' held-out phrasings and
    natural questions only (the made-up titles' probes are not a validation of what was trained)."""
    columns = tokens.columns if isinstance(tokens, pd.DataFrame) else (store or store_for(tokens)).schema(tokens).names
    by_phrasing = split == "heldout" and "phrasing_set" in columns
    kept = ["id", "input_ids", "labels"]
    rows, _ = open_tokens(tokens, store, split=split, columns=kept + ["phrasing_set"] * by_phrasing)
    if by_phrasing:
        rows = rows.filter(pc.not_equal(rows.column("phrasing_set"), "unknown")).select(kept)
    return rows


def _batch_reader(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None, batch_rows: int | None):
    """A function giving the rows again as DataFrames of at most `batch_rows` rows (each call reads anew)."""
    if isinstance(tokens, pd.DataFrame):
        step = batch_rows or max(len(tokens), 1)
        return lambda: (tokens.iloc[start:start + step] for start in range(0, len(tokens), step))
    from data_contracts import TOKENS
    from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
    from loraflow.runtime.stage_output import read_input_batches

    store = store or store_for(tokens)
    return lambda: read_input_batches(store, tokens, TOKENS, batch_rows or ROW_GROUP_ROWS)


def scored_tokens(labels: pa.ChunkedArray) -> int:
    """Labels other than -100 after each row's first (what a causal-LM loss scores after its shift by one)."""
    total = 0
    for chunk in labels.chunks:
        if len(chunk):
            values = chunk.flatten().to_numpy()
            first = pc.list_element(chunk, 0).to_numpy(zero_copy_only=False)
            total += int(np.count_nonzero(values != IGNORE_INDEX)) - int(np.count_nonzero(first != IGNORE_INDEX))
    return total
