"""Pre-flight: checks on the tokens that training will read, so a bad mask fails here, not hours later.

Raises PreflightError (all problems at once, each with example ids and the fix) when:
- an example has no trained token;
- an answer does not end with a trained EOS / end-of-turn token (the model would never learn to stop);
- an example starts with two BOS tokens;
- chat_template: the training prompt tokens differ from `apply_chat_template(messages[:-1],
  add_generation_prompt=True)` on a deterministic sample (training and inference would disagree);
- the train split is empty.
"""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.format import FormatConfig
from loraflow.runtime.stage_output import rows_at
from loraflow.runtime.cache_keys import TOKENIZER_STAGE_CACHE
from loraflow.runtime.stage_task import stage_task
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from tasks.format import evenly_spaced, load_tokenizer_dir
from loraflow.templates import build_template

PROMPT_SAMPLE = 50


class PreflightError(RuntimeError):
    """The tokens are not safe to train on; the message lists every failed check."""


def stop_token_ids(format_config: FormatConfig, tokenizer) -> set[int]:
    """Ids that may end a trained answer: EOS, and the template's end-of-turn marker when it is one token."""
    template = build_template(format_config.template, tokenizer)
    ids = {tokenizer.eos_token_id}
    for text in template.stop_texts():
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return ids


NEEDED = ("id", "input_ids", "labels", "answer_start", "answer_ends", "truncated", "split", "kind", "prompt")


class PreflightCounts:
    """The checks' counts over tokens rows seen a batch at a time: totals, and the first few ids of each problem."""

    def __init__(self, stop_ids: set[int], bos: int | None):
        self.stop_ids, self.bos = stop_ids, bos
        self.rows = self.answers_checked = 0
        self.problem_ids = {"no_trained_token": [], "no_stop": [], "double_bos": []}
        self.problems = dict.fromkeys(self.problem_ids, 0)
        self.splits: dict[str, int] = {}

    def add(self, tokens_frame: pd.DataFrame) -> None:
        """Count one batch; vectorised over flat arrays (75k rows in well under a second)."""
        ids = tokens_frame["id"].to_numpy()
        lengths = np.fromiter(map(len, tokens_frame["input_ids"]), dtype=np.int64, count=len(tokens_frame))
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat_ids, flat_labels = _flat(tokens_frame["input_ids"]), _flat(tokens_frame["labels"])

        # ---- something to train in every example
        trained_cumsum = np.concatenate([[0], np.cumsum(flat_labels != IGNORE_INDEX)])
        self._found("no_trained_token", ids[(trained_cumsum[starts[1:]] - trained_cumsum[starts[:-1]]) == 0])

        # ---- every kept answer ends with a trained stop token
        counts = np.fromiter(map(len, tokens_frame["answer_ends"]), dtype=np.int64, count=len(tokens_frame))
        ends = _flat(tokens_frame["answer_ends"]).astype(np.int64)
        rows = np.repeat(np.arange(len(tokens_frame)), counts)
        inside = ends < lengths[rows]
        at = starts[rows] + np.where(inside, ends, 0)
        good = inside & np.isin(flat_ids[at], list(self.stop_ids)) & (flat_labels[at] != IGNORE_INDEX)
        bad_rows = set(rows[~good].tolist()) | set(np.flatnonzero((counts == 0) & ~tokens_frame["truncated"].to_numpy()).tolist())
        self._found("no_stop", ids[sorted(bad_rows)])
        self.answers_checked += int(len(ends))

        # ---- no double BOS
        two = lengths >= 2
        first = starts[:-1][two]
        if self.bos is not None:
            self._found("double_bos", ids[two][(flat_ids[first] == self.bos) & (flat_ids[first + 1] == self.bos)])
        for split, count in tokens_frame["split"].value_counts(sort=False).items():
            self.splits[str(split)] = self.splits.get(str(split), 0) + int(count)
        self.rows += len(tokens_frame)

    def _found(self, check: str, ids: np.ndarray) -> None:
        self.problems[check] += len(ids)
        self.problem_ids[check] += ids[: max(0, 3 - len(self.problem_ids[check]))].tolist()


def preflight(tokens_frame: pd.DataFrame, formatted_frame: pd.DataFrame, format_config: FormatConfig, tokenizer,
              sample: int = PROMPT_SAMPLE) -> dict:
    """Run every check; return the report, or raise PreflightError listing the failures."""
    missing = [c for c in NEEDED if c not in tokens_frame.columns] + \
        [f"formatted.{c}" for c in ("id", "messages") if c not in formatted_frame.columns]
    refuse_missing(missing)
    counts = PreflightCounts(stop_token_ids(format_config, tokenizer), tokenizer.bos_token_id)
    counts.add(tokens_frame)
    chat = format_config.template == "chat_template"
    prompt_check = check_prompts(tokens_frame, formatted_frame, tokenizer, sample, chat_template=chat)
    return verdict(counts, prompt_check, format_config, tokenizer)


def refuse_missing(missing: list[str]) -> None:
    """Stop when the artifacts lack a column the checks read (written by an older loraflow)."""
    if missing:
        raise PreflightError(f"pre-flight needs the columns the tokenize/format stages write; missing {missing}: "
                             "re-run format and tokenize with this version of loraflow")


def verdict(counts: PreflightCounts, prompt_check: dict, format_config: FormatConfig, tokenizer) -> dict:
    """The report of every check, or PreflightError listing each failed one with example ids and the fix."""
    problems: list[str] = []
    report: dict = {"rows": counts.rows, "template": format_config.template}
    untrained, examples = counts.problems["no_trained_token"], counts.problem_ids["no_trained_token"]
    report["no_trained_token"] = untrained
    if untrained:
        problems.append(f"{untrained} example(s) have no trained token (e.g. {examples}): every label is -100; "
                        "check the template's answer segments and tokenize.max_length")
    stop_ids = counts.stop_ids
    report["stop_token_ids"] = sorted(int(i) for i in stop_ids)
    no_stop, examples = counts.problems["no_stop"], counts.problem_ids["no_stop"]
    report.update({"answers_checked": counts.answers_checked, "answers_without_trained_eos": no_stop})
    if no_stop:
        problems.append(
            f"{no_stop} example(s) have an answer that does not end with a trained EOS/end-of-turn token "
            f"{sorted(stop_ids)} (e.g. {examples}): the model would not learn to stop; the template must put "
            f"{tokenizer.eos_token!r} (or a special end marker) after each answer, inside the trained segment"
        )
    double_bos, examples = counts.problems["double_bos"], counts.problem_ids["double_bos"]
    report["double_bos"] = double_bos
    if double_bos:
        problems.append(f"{double_bos} example(s) start with two BOS tokens (e.g. {examples}): the template "
                        "writes BOS as text, so the tokenizer must not add another (add_special_tokens=False)")

    # ---- training prompt == inference prompt (chat_template)
    chat = format_config.template == "chat_template"
    report["prompt_check"] = prompt_check
    if chat and prompt_check["mismatched"]:
        problems.append(
            f"{prompt_check['mismatched']} of {prompt_check['checked']} sampled example(s) have training prompt tokens "
            f"that differ from apply_chat_template(messages[:-1], add_generation_prompt=True) (e.g. "
            f"{prompt_check['examples'][:3]}): training and inference would see different prompts; re-run format (the "
            "fast render fell out of step with the template)"
        )

    # ---- a train split to train on
    report["splits"] = dict(sorted(counts.splits.items(), key=lambda item: -item[1]))
    if not counts.splits.get("train"):
        problems.append(f"the train split is empty (splits: {report['splits']}): lower tokenize.validation_fraction, "
                        "or add source rows; heldout phrasings never train")

    report["passed"] = not problems
    if problems:
        raise PreflightError("pre-flight failed:\n- " + "\n- ".join(problems))
    return report


def _flat(column) -> np.ndarray:
    """All rows' arrays of a list column, concatenated."""
    arrays = [np.asarray(value) for value in column]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def check_prompts(tokens_frame: pd.DataFrame, formatted_frame: pd.DataFrame, tokenizer, sample: int,
                  chat_template: bool = True) -> dict:
    """Compare training prompt tokens (input_ids[:answer_start]) with the inference prompt's tokens on an
    evenly spread sample of chat examples (not kind=text, not truncated): apply_chat_template(messages[:-1],
    add_generation_prompt=True) for chat_template, else the formatted `prompt` text tokenized alone (reported)."""
    # Rows whose data spells a control token are tokenized with it as plain text, which apply_chat_template
    # (and a plain tokenizer call) would not do: they are left out here and counted.
    literal = set(formatted_frame["id"][formatted_frame["literal_spans"].map(len) > 0]) if "literal_spans" in formatted_frame else set()
    candidates = tokens_frame[(tokens_frame["kind"] != "text") & ~tokens_frame["truncated"]
                              & ~tokens_frame["id"].isin(literal)].reset_index(drop=True)
    chosen = candidates.iloc[evenly_spaced(len(candidates), sample)]
    messages_by_id = dict(zip(formatted_frame["id"], formatted_frame["messages"]))
    return compare_prompts(chosen, messages_by_id, tokenizer, chat_template, int(tokens_frame["id"].isin(literal).sum()))


def compare_prompts(chosen: pd.DataFrame, messages_by_id: dict, tokenizer, chat_template: bool, skipped_control_text: int) -> dict:
    """The prompt check on the chosen tokens rows (id, input_ids, answer_start, prompt)."""
    checked, mismatched = 0, []
    for row in chosen.itertuples(index=False):
        if chat_template:
            messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages_by_id[row.id]]
            expected = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            expected = tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
        checked += 1
        if list(np.asarray(row.input_ids)[: row.answer_start]) != list(expected):
            mismatched.append(row.id)
    return {"against": "apply_chat_template" if chat_template else "prompt_text", "checked": checked,
            "mismatched": len(mismatched), "examples": mismatched[:10], "skipped_control_text": skipped_control_text}


def run_preflight(tokens_ref: ArtifactRef, formatted_ref: ArtifactRef, format_config: FormatConfig, tokenizer_dir: str,
                  store: ArtifactStore, sample: int = PROMPT_SAMPLE) -> dict:
    """`preflight` over the artifacts a batch at a time: streaming counts of every row, the prompt check on a sample."""
    tokenizer = load_tokenizer_dir(str(tokenizer_dir))
    tokens_columns, formatted_columns = store.schema(tokens_ref).names, store.schema(formatted_ref).names
    refuse_missing([c for c in NEEDED if c not in tokens_columns] +
                   [f"formatted.{c}" for c in ("id", "messages") if c not in formatted_columns])
    literal = literal_ids(store, formatted_ref) if "literal_spans" in formatted_columns else set()
    counts = PreflightCounts(stop_token_ids(format_config, tokenizer), tokenizer.bos_token_id)
    candidates, skipped_control_text, first_row = [], 0, 0
    for batch in store.read_batches(tokens_ref, columns=list(NEEDED)):
        frame = batch.to_pandas()
        counts.add(frame)
        in_literal = frame["id"].isin(literal).to_numpy()
        candidates.append(np.flatnonzero((frame["kind"] != "text").to_numpy() & ~frame["truncated"].to_numpy() & ~in_literal) + first_row)
        skipped_control_text += int(in_literal.sum())
        first_row += len(frame)
    candidates = np.concatenate(candidates) if candidates else np.zeros(0, dtype=np.int64)
    chosen = rows_at(store, tokens_ref, candidates[evenly_spaced(len(candidates), sample)], ["id", "input_ids", "answer_start", "prompt"])
    chat = format_config.template == "chat_template"
    messages_by_id = messages_of(store, formatted_ref, set(chosen["id"])) if chat else {}
    return verdict(counts, compare_prompts(chosen, messages_by_id, tokenizer, chat, skipped_control_text), format_config, tokenizer)


def literal_ids(store: ArtifactStore, formatted_ref: ArtifactRef) -> set[str]:
    """Ids of formatted rows whose data spells a control token (non-empty literal_spans)."""
    found = set()
    for batch in store.read_batches(formatted_ref, columns=["id", "literal_spans"]):
        spans = batch.column("literal_spans")
        found.update(np.asarray(batch.column("id").to_pylist(), dtype=object)[pc.list_value_length(spans).to_numpy(zero_copy_only=False) > 0])
    return found


def messages_of(store: ArtifactStore, formatted_ref: ArtifactRef, ids: set[str]) -> dict:
    """id -> messages of the formatted rows with those ids."""
    found = {}
    for batch in store.read_batches(formatted_ref, columns=["id", "messages"]):
        wanted = pc.is_in(batch.column("id"), value_set=pa.array(sorted(ids), type=batch.schema.field("id").type))
        if pc.any(wanted).as_py():
            part = batch.filter(wanted).to_pandas()
            found.update(zip(part["id"], part["messages"]))
    return found


@stage_task(name="preflight", cache_policy=TOKENIZER_STAGE_CACHE)
def preflight_task(tokens_ref: ArtifactRef, formatted_ref: ArtifactRef, format_config: FormatConfig, tokenizer_dir: str,
                   tokenizer_fingerprint: str, store_root: str) -> dict:
    """Prefect task around `run_preflight`, cached like a stage (the tokens and formatted artifacts' hashes, the
    tokenizer's fingerprint, the format config and this code): a passed check of unchanged tokens is not re-run; a
    failed one raises and is never cached."""
    return run_preflight(tokens_ref, formatted_ref, format_config, tokenizer_dir, ArtifactStore(store_root))
