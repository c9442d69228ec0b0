"""Format: conversations -> text segments that keep which characters are trained.

Each conversation is rendered by the configured template (loraflow/templates/) into segments whose
concatenation is the training text; trained segments are the assistant contents plus the end-of-turn/EOS
marker after each. `prompt` is the text before the final answer (what inference is given, generation
prompt included), `reference` the final answer. Rows a template cannot render are quarantined.

Text from the data that spells one of the tokenizer's control tokens (`<|im_end|>` inside an answer) is
rendered as it is, and its spans go into `literal_spans` so tokenize keeps it plain text
(loraflow/templates/control_text.py); such rows are counted (`control_text_rows`) and warned about.
"""

from functools import lru_cache

import numpy as np
import pandas as pd

from data_contracts import CONVERSATIONS, FORMATTED
from data_contracts.base import quarantine_rows
from loraflow.config.format import FormatConfig
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
from loraflow.runtime.stage_output import StageResult, StageWriter, read_input_batches, rows_at
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.cache_keys import TOKENIZER_STAGE_CACHE
from loraflow.runtime.stage_task import stage_task
from loraflow.templates import ChatTemplate, build_template, render_text, with_system
from loraflow.templates.control_text import ControlTextGuard

PASSTHROUGH = ("kind", "source_id", "phrasing_set", "facts")


@lru_cache(maxsize=4)
def load_tokenizer_dir(tokenizer_dir: str):
    """The tokenizer in `tokenizer_dir` (loaded once per process), with a pad token."""
    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import load_tokenizer

    return load_tokenizer(ModelConfig(base=str(tokenizer_dir)))


def evenly_spaced(count: int, sample: int) -> list[int]:
    """A deterministic sample of row positions spread over the whole frame."""
    if count == 0 or sample == 0:
        return []
    return sorted(set(np.linspace(0, count - 1, num=min(sample, count)).round().astype(int).tolist()))


def format_conversations(conversations: pd.DataFrame, config: FormatConfig, tokenizer) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Render every conversation; returns (formatted rows, quarantined rows, stats)."""
    template = build_template(config.template, tokenizer)
    messages, edge_turns = prepared_messages(conversations["messages"], config)
    kinds = conversations["kind"].tolist()
    stats = format_settings(config, edge_turns)
    if isinstance(template, ChatTemplate):
        stats.update(_check_fast_render(template, messages, kinds, config.verify_sample))
    formatted, quarantined, counts = render_batch(conversations.reset_index(drop=True), messages, template, config)
    return formatted, quarantined, {**stats, **counts}


def prepared_messages(messages_column, config: FormatConfig) -> tuple[list[list[dict]], int]:
    """The conversations with the configured system prompt (and stripped turns when asked); (messages, turns with
    whitespace at their edges)."""
    messages = [with_system(m, config.system_prompt) for m in messages_column]
    # Whitespace at a turn's edges is data unless the config says otherwise; either way it is counted, never silent.
    edge_turns = sum(m["content"] != m["content"].strip() for conversation in messages for m in conversation)
    if config.strip_whitespace:
        messages = [[{**m, **{key: m[key].strip() for key in ("content", "input") if isinstance(m.get(key), str)}}
                     for m in conversation] for conversation in messages]
    return messages, edge_turns


def format_settings(config: FormatConfig, edge_turns: int) -> dict:
    """The stats that say how the stage was configured, with the count of turns with edge whitespace."""
    return {"template": config.template, "strip_whitespace": config.strip_whitespace,
            "whitespace_stripped_turns" if config.strip_whitespace else "turns_with_edge_whitespace_kept": edge_turns}


def render_batch(conversations: pd.DataFrame, messages: list[list[dict]], template, config: FormatConfig) \
        -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Render prepared conversations with `template`: (formatted rows, quarantined rows, counts); a quarantined row's
    row_index is its index in `conversations`."""
    kinds = conversations["kind"].tolist()
    guard = ControlTextGuard(template.facts.special_texts)
    rows, bad_positions, bad_reasons = [], [], []
    for position, (conversation, kind) in enumerate(zip(messages, kinds)):
        try:
            escaped, has_control_text = guard.escape(conversation)
            if kind == "text":
                rendered = render_text(_last_answer(escaped), template.facts)
            else:
                rendered = template.render(escaped)
            rendered, literal_spans = guard.restore(rendered) if has_control_text else (rendered, [])
        except Exception as error:  # noqa: BLE001 - Jinja and template errors alike: the row is quarantined with the message
            bad_positions.append(position)
            bad_reasons.append(f"render_failed: template {config.template} could not render this conversation ({error})")
            continue
        rows.append((position, rendered, conversation, literal_spans))

    source = conversations.reset_index(drop=True)
    keep = [position for position, _, _, _ in rows]
    formatted = pd.DataFrame({
        "id": source["id"].to_numpy()[keep] if keep else [],
        "segments": [[{"text": text, "trained": trained} for text, trained in r.segments] for _, r, _, _ in rows],
        "prompt": [r.prompt for _, r, _, _ in rows],
        "reference": [r.reference for _, r, _, _ in rows],
        "template": [config.template] * len(rows),
        **{column: source[column].to_numpy()[keep] if keep else [] for column in PASSTHROUGH},
        "messages": [conversation for _, _, conversation, _ in rows],
        "literal_spans": [spans for _, _, _, spans in rows],
    })
    bad_index = conversations.index[bad_positions]
    quarantined = quarantine_rows(source.iloc[bad_positions].set_axis(bad_index), pd.Series(bad_reasons, index=bad_index), "formatted")
    counts = {"rendered": len(rows), "render_failed": len(bad_positions),
              "control_text_rows": sum(bool(spans) for _, _, _, spans in rows)}
    return formatted, quarantined, counts


def _check_fast_render(template: ChatTemplate, messages, kinds, sample: int) -> dict:
    """Prove the derived chat-template glue on a sample of the real data; fall back to per-example rendering if not."""
    if not template.fast:
        return {"chat_template_render": "per_example", "chat_template_reason": "probe conversations did not give a consistent pattern"}
    positions = [p for p in evenly_spaced(len(messages), sample) if kinds[p] != "text"]
    mismatched = template.verify([messages[p] for p in positions])
    if mismatched:
        template.fast = False
        return {"chat_template_render": "per_example", "chat_template_checked": len(positions),
                "chat_template_reason": f"fast render differed from apply_chat_template on {len(mismatched)} sampled rows"}
    return {"chat_template_render": "fast", "chat_template_checked": len(positions)}


def _last_answer(messages: list[dict]) -> str:
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if len(answers) != 1:
        raise ValueError(f"kind=text needs exactly one assistant message holding the text, found {len(answers)}")
    return answers[0]


def run_format(conversations_ref: ArtifactRef, config: FormatConfig, tokenizer_dir: str, store: ArtifactStore,
               batch_rows: int = ROW_GROUP_ROWS) -> StageResult:
    """Read conversations a batch at a time, render them, write the FORMATTED artifact (and quarantine).

    The chat template's fast render is proven first on an evenly spread sample of the whole artifact, as one
    whole-table call would, so every batch is rendered the same way."""
    from loraflow.config.pipeline import config_hash

    template = build_template(config.template, load_tokenizer_dir(str(tokenizer_dir)))
    stats = format_settings(config, 0)
    if isinstance(template, ChatTemplate):
        sample = rows_at(store, conversations_ref, evenly_spaced(conversations_ref.rows, config.verify_sample), ["messages", "kind"])
        messages, _ = prepared_messages(sample["messages"], config)
        # positions are those of the sample itself: every one of its rows is checked, as in format_conversations
        stats.update(_check_fast_render(template, messages, sample["kind"].tolist(), len(sample)))
    output = StageWriter(store, stage="format", contract=FORMATTED, config_hash=config_hash(config), row_group_rows=batch_rows)
    edge_key, counts = next(iter(k for k in stats if k.startswith(("whitespace", "turns_with")))), {}
    try:
        for conversations in read_input_batches(store, conversations_ref, CONVERSATIONS, batch_rows):
            messages, edge_turns = prepared_messages(conversations["messages"], config)
            formatted, quarantined, batch_counts = render_batch(conversations, messages, template, config)
            output.add(formatted, quarantined)
            stats[edge_key] += edge_turns
            counts = {key: counts.get(key, 0) + value for key, value in batch_counts.items()}
    except BaseException:
        output.abort()
        raise
    return output.finish(rows_in=conversations_ref.rows, stats={**stats, **counts})


@stage_task(name="format", cache_policy=TOKENIZER_STAGE_CACHE)
def format_task(conversations_ref: ArtifactRef, config: FormatConfig, tokenizer_dir: str, tokenizer_fingerprint: str,
                store_root: str) -> StageResult:
    """Prefect task around `run_format`; `tokenizer_fingerprint` puts the tokenizer into the cache key."""
    return run_format(conversations_ref, config, tokenizer_dir, ArtifactStore(store_root))
