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
from prefect import task

from data_contracts import FORMATTED, TOKENS
from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.format import FormatConfig
from loraflow.runtime.stage_output import read_input
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


def preflight(tokens_frame: pd.DataFrame, formatted_frame: pd.DataFrame, format_config: FormatConfig, tokenizer,
              sample: int = PROMPT_SAMPLE) -> dict:
    """Run every check; return the report, or raise PreflightError listing the failures."""
    problems: list[str] = []
    report: dict = {"rows": len(tokens_frame), "template": format_config.template}
    missing = [c for c in ("id", "input_ids", "labels", "answer_start", "answer_ends", "truncated", "split", "kind", "prompt")
               if c not in tokens_frame.columns] + [f"formatted.{c}" for c in ("id", "messages") if c not in formatted_frame.columns]
    if missing:
        raise PreflightError(f"pre-flight needs the columns the tokenize/format stages write; missing {missing}: "
                             "re-run format and tokenize with this version of loraflow")

    # Flat arrays over all rows: the checks are vectorised (75k rows in well under a second).
    ids = tokens_frame["id"].to_numpy()
    lengths = np.fromiter(map(len, tokens_frame["input_ids"]), dtype=np.int64, count=len(tokens_frame))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_ids = _flat(tokens_frame["input_ids"])
    flat_labels = _flat(tokens_frame["labels"])

    # ---- something to train in every example
    trained_cumsum = np.concatenate([[0], np.cumsum(flat_labels != IGNORE_INDEX)])
    untrained = ids[(trained_cumsum[starts[1:]] - trained_cumsum[starts[:-1]]) == 0].tolist()
    report["no_trained_token"] = len(untrained)
    if untrained:
        problems.append(f"{len(untrained)} example(s) have no trained token (e.g. {untrained[:3]}): every label is -100; "
                        "check the template's answer segments and tokenize.max_length")

    # ---- every kept answer ends with a trained stop token
    stop_ids = stop_token_ids(format_config, tokenizer)
    report["stop_token_ids"] = sorted(int(i) for i in stop_ids)
    counts = np.fromiter(map(len, tokens_frame["answer_ends"]), dtype=np.int64, count=len(tokens_frame))
    ends = _flat(tokens_frame["answer_ends"]).astype(np.int64)
    rows = np.repeat(np.arange(len(tokens_frame)), counts)
    inside = ends < lengths[rows]
    at = starts[rows] + np.where(inside, ends, 0)
    good = inside & np.isin(flat_ids[at], list(stop_ids)) & (flat_labels[at] != IGNORE_INDEX)
    bad_rows = set(rows[~good].tolist()) | set(np.flatnonzero((counts == 0) & ~tokens_frame["truncated"].to_numpy()).tolist())
    no_stop = ids[sorted(bad_rows)].tolist()
    report.update({"answers_checked": int(len(ends)), "answers_without_trained_eos": len(no_stop)})
    if no_stop:
        problems.append(
            f"{len(no_stop)} example(s) have an answer that does not end with a trained EOS/end-of-turn token "
            f"{sorted(stop_ids)} (e.g. {no_stop[:3]}): the model would not learn to stop; the template must put "
            f"{tokenizer.eos_token!r} (or a special end marker) after each answer, inside the trained segment"
        )

    # ---- no double BOS
    bos = tokenizer.bos_token_id
    two = lengths >= 2
    first = starts[:-1][two]
    double_bos = [] if bos is None else ids[two][(flat_ids[first] == bos) & (flat_ids[first + 1] == bos)].tolist()
    report["double_bos"] = len(double_bos)
    if double_bos:
        problems.append(f"{len(double_bos)} example(s) start with two BOS tokens (e.g. {double_bos[:3]}): the template "
                        "writes BOS as text, so the tokenizer must not add another (add_special_tokens=False)")

    # ---- training prompt == inference prompt (chat_template)
    chat = format_config.template == "chat_template"
    report["prompt_check"] = check_prompts(tokens_frame, formatted_frame, tokenizer, sample, chat_template=chat)
    if chat and report["prompt_check"]["mismatched"]:
        check = report["prompt_check"]
        problems.append(
            f"{check['mismatched']} of {check['checked']} sampled example(s) have training prompt tokens that differ from "
            f"apply_chat_template(messages[:-1], add_generation_prompt=True) (e.g. {check['examples'][:3]}): training and "
            "inference would see different prompts; re-run format (the fast render fell out of step with the template)"
        )

    # ---- a train split to train on
    splits = tokens_frame["split"].value_counts().to_dict() if len(tokens_frame) else {}
    report["splits"] = {k: int(v) for k, v in splits.items()}
    if not splits.get("train"):
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
    messages_by_id = dict(zip(formatted_frame["id"], formatted_frame["messages"]))
    checked, mismatched = 0, []
    for position in evenly_spaced(len(candidates), sample):
        row = candidates.iloc[position]
        if chat_template:
            messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages_by_id[row["id"]]]
            expected = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            expected = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        checked += 1
        if list(np.asarray(row["input_ids"])[: row["answer_start"]]) != list(expected):
            mismatched.append(row["id"])
    return {"against": "apply_chat_template" if chat_template else "prompt_text", "checked": checked,
            "mismatched": len(mismatched), "examples": mismatched[:10],
            "skipped_control_text": int(tokens_frame["id"].isin(literal).sum())}


def run_preflight(tokens_ref: ArtifactRef, formatted_ref: ArtifactRef, format_config: FormatConfig, tokenizer_dir: str,
                  store: ArtifactStore) -> dict:
    """Read the tokens and formatted artifacts and run `preflight`."""
    tokens_frame = read_input(store, tokens_ref, TOKENS)
    formatted_frame = read_input(store, formatted_ref, FORMATTED)
    return preflight(tokens_frame, formatted_frame, format_config, load_tokenizer_dir(str(tokenizer_dir)))


# Not cached: the checks are cheap and must run on every prepare, whatever the cache says.
@task(name="preflight")
def preflight_task(tokens_ref: ArtifactRef, formatted_ref: ArtifactRef, format_config: FormatConfig, tokenizer_dir: str,
                   store_root: str) -> dict:
    """Prefect task around `run_preflight`."""
    return run_preflight(tokens_ref, formatted_ref, format_config, tokenizer_dir, ArtifactStore(store_root))
