"""Pre-flight: passes on good tokens; each failure is triggered and named."""

import numpy as np
import pandas as pd
import pytest

from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.format import FormatConfig
from loraflow.config.tokenize import TokenizeConfig
from loraflow.runtime.artifact_store import ArtifactStore
from tasks.format import format_conversations
from tasks.preflight import PreflightError, preflight, run_preflight
from tasks.tokenize import tokenize_formatted


def conversation(i, phrasing_set="train"):
    return {"id": f"c{i}", "messages": [{"role": "user", "content": f"Who made show {i}?"},
                                         {"role": "assistant", "content": f"Studio {i}."}],
            "kind": "overview", "source": "s", "source_row": i, "source_id": str(i), "phrasing_set": phrasing_set, "facts": []}


@pytest.fixture(scope="module")
def prepared(tokenizer):
    config = FormatConfig(system_prompt="Be brief.")
    formatted, _, _ = format_conversations(pd.DataFrame([conversation(i) for i in range(12)]), config, tokenizer)
    tokens, _, _ = tokenize_formatted(formatted, TokenizeConfig(validation_fraction=0.2), tokenizer)
    return tokens, formatted, config


def copy_tokens(tokens):
    return tokens.assign(input_ids=[np.array(x) for x in tokens["input_ids"]], labels=[np.array(x) for x in tokens["labels"]])


def test_good_tokens_pass_with_a_report(prepared, tokenizer):
    tokens, formatted, config = prepared
    report = preflight(tokens, formatted, config, tokenizer)
    assert report["passed"] and report["prompt_check"] == {"against": "apply_chat_template", "checked": 12, "mismatched": 0, "examples": [],
                                                          "skipped_control_text": 0}
    assert report["answers_checked"] == 12 and report["stop_token_ids"] == [tokenizer.eos_token_id]


def test_no_trained_token_fails(prepared, tokenizer):
    tokens, formatted, config = prepared
    broken = copy_tokens(tokens)
    broken.at[0, "labels"] = np.full(len(broken.at[0, "labels"]), IGNORE_INDEX)
    with pytest.raises(PreflightError, match="no trained token"):
        preflight(broken, formatted, config, tokenizer)


def test_untrained_eos_fails(prepared, tokenizer):
    tokens, formatted, config = prepared
    broken = copy_tokens(tokens)
    end = broken.at[3, "answer_ends"][-1]
    broken.at[3, "labels"][end] = IGNORE_INDEX  # e.g. masked by pad id because pad == eos
    with pytest.raises(PreflightError, match="not learn to stop"):
        preflight(broken, formatted, config, tokenizer)


def test_answer_without_eos_fails(tokenizer):
    formatted, _, _ = format_conversations(pd.DataFrame([conversation(i) for i in range(3)]), FormatConfig(template="chatml"), tokenizer)
    # A template that forgot the end marker: the trained segment is the bare answer.
    formatted["segments"] = [[{**s, "text": s["text"].replace("<|im_end|>", "")} if s["trained"] else s for s in segs]
                             for segs in formatted["segments"]]
    tokens, _, _ = tokenize_formatted(formatted, TokenizeConfig(validation_fraction=0.0), tokenizer)
    with pytest.raises(PreflightError, match="does not end with a trained EOS"):
        preflight(tokens, formatted, FormatConfig(template="chatml"), tokenizer)


def test_double_bos_fails(prepared, tokenizer):
    tokens, formatted, config = prepared
    broken = copy_tokens(tokens)
    broken.at[0, "input_ids"] = np.concatenate([[tokenizer.bos_token_id], broken.at[0, "input_ids"]])
    broken.at[0, "labels"] = np.concatenate([[IGNORE_INDEX], broken.at[0, "labels"]])
    broken["answer_ends"] = [[int(e) + (i == 0) for e in ends] for i, ends in enumerate(broken["answer_ends"])]
    with pytest.raises(PreflightError, match="two BOS"):
        preflight(broken, formatted, config, tokenizer)


def test_prompt_differing_from_apply_chat_template_fails(prepared, tokenizer):
    tokens, formatted, config = prepared
    broken = formatted.copy()
    # The pipeline rendered one system prompt, inference would render another.
    broken["messages"] = [[{**m, "content": "Other."} if m["role"] == "system" else m for m in ms] for ms in broken["messages"]]
    with pytest.raises(PreflightError, match=r"12 of 12 sampled example\(s\) have training prompt tokens"):
        preflight(tokens, broken, config, tokenizer)


def test_empty_train_split_fails(prepared, tokenizer):
    tokens, formatted, config = prepared
    with pytest.raises(PreflightError, match="train split is empty"):
        preflight(tokens.assign(split="validation"), formatted, config, tokenizer)


def test_all_problems_are_listed_at_once(prepared, tokenizer):
    tokens, formatted, config = prepared
    broken = copy_tokens(tokens).assign(split="heldout")
    broken.at[0, "labels"] = np.full(len(broken.at[0, "labels"]), IGNORE_INDEX)
    with pytest.raises(PreflightError) as error:
        preflight(broken, formatted, config, tokenizer)
    assert "no trained token" in str(error.value) and "train split is empty" in str(error.value)


@pytest.mark.parametrize("template", ["alpaca", "ko_instruction", "llama2_chat", "gemma", "chatml"])
def test_fixed_templates_pass(template, tokenizer):
    config = FormatConfig(template=template)
    formatted, _, _ = format_conversations(pd.DataFrame([conversation(i) for i in range(4)]), config, tokenizer)
    tokens, _, _ = tokenize_formatted(formatted, TokenizeConfig(validation_fraction=0.0), tokenizer)
    report = preflight(tokens, formatted, config, tokenizer)
    assert report["passed"] and report["prompt_check"]["against"] == "prompt_text" and report["prompt_check"]["mismatched"] == 0


def test_run_preflight_reads_artifacts(tmp_path, model_dir, prepared):
    tokens, formatted, config = prepared
    store = ArtifactStore(tmp_path)
    tokens_ref = store.write(tokens, stage="tokenize", contract="tokens", schema_version=2, config_hash="x")
    formatted_ref = store.write(formatted, stage="format", contract="formatted", schema_version=2, config_hash="x")
    assert run_preflight(tokens_ref, formatted_ref, config, str(model_dir), store)["passed"]
