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
from loraflow.runtime.stage_output import StageResult, read_input, write_stage_output
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
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
    messages = [with_system(m, config.system_prompt) for m in conversations["messages"]]
    # Whitespace at a turn's edges is data unless the config says otherwise; either way it is counted, never silent.
    edge_turns = sum(m["content"] != m["content"].strip() for conversation in messages for m in conversation)
    if config.strip_whitespace:
        messages = [[{**m, **{key: m[key].strip() for key in ("content", "input") if isinstance(m.get(key), str)}}
                     for m in conversation] for conversation in messages]
    kinds = conversations["kind"].tolist()
    stats = {"template": config.template, "strip_whitespace": config.strip_whitespace,
             "whitespace_stripped_turns" if config.strip_whitespace else "turns_with_edge_whitespace_kept": edge_turns}
    if isinstance(template, ChatTemplate):
        stats.update(_check_fast_render(template, messages, kinds, config.verify_sample))

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
    quarantined = quarantine_rows(source.iloc[bad_positions], pd.Series(bad_reasons, index=bad_positions), "formatted")
    stats.update({"rendered": len(rows), "render_failed": len(bad_positions),
                  "control_text_rows": sum(bool(spans) for _, _, _, spans in rows)})
    return formatted, quarantined, stats


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


def run_format(conversations_ref: ArtifactRef, config: FormatConfig, tokenizer_dir: str, store: ArtifactStore) -> StageResult:
    """Read conversations, render them, write the FORMATTED artifact (and quarantine)."""
    from loraflow.config.pipeline import config_hash

    conversations = read_input(store, conversations_ref, CONVERSATIONS)
    formatted, quarantined, stats = format_conversations(conversations, config, load_tokenizer_dir(str(tokenizer_dir)))
    return write_stage_output(
        store, stage="format", contract=FORMATTED, frame=formatted, rows_in=len(conversations),
        config_hash=config_hash(config), quarantined=quarantined, stats=stats,
    )


@stage_task(name="format")
def format_task(conversations_ref: ArtifactRef, config: FormatConfig, tokenizer_dir: str, tokenizer_fingerprint: str,
                store_root: str) -> StageResult:
    """Prefect task around `run_format`; `tokenizer_fingerprint` puts the tokenizer into the cache key."""
    return run_format(conversations_ref, config, tokenizer_dir, ArtifactStore(store_root))
