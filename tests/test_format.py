"""Format: golden renders per template, the chat-template fast path against apply_chat_template, rows accounting.

Regenerate golden files after an intended change: UPDATE_GOLDEN=1 pytest tests/test_format.py
"""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from data_contracts import CONVERSATIONS, FORMATTED, enforce
from loraflow.config.format import FormatConfig
from loraflow.runtime.artifact_store import ArtifactStore
from tasks.format import format_conversations, run_format
from loraflow.templates import TEMPLATES, ChatTemplate, build_template
from loraflow.templates.chat_template import PROBE_CONVERSATIONS

GOLDEN = Path(__file__).parent / "golden"


def conversation(id_, messages, kind="overview", source_id="1", phrasing_set="train"):
    return {"id": id_, "messages": messages, "kind": kind, "source": "s", "source_row": 0, "source_id": source_id,
            "phrasing_set": phrasing_set, "facts": [{"column": "title", "value": "Moon Rabbit"}]}


# The fixed input of the golden files: single turn with a system turn and an Alpaca-style input, multi-turn
# without a system turn, and Korean with and without an input.
GOLDEN_CONVERSATIONS = [
    conversation("single-with-input", [
        {"role": "system", "content": "You are an anime catalog assistant."},
        {"role": "user", "content": "Summarize the synopsis.\n\nA rabbit builds a rocket to the moon.",
         "input": "A rabbit builds a rocket to the moon."},
        {"role": "assistant", "content": "A rabbit travels to the moon in a home-made rocket."},
    ]),
    conversation("multi-turn", [
        {"role": "user", "content": "Who made Moon Rabbit?"},
        {"role": "assistant", "content": "Studio Tsuki made it."},
        {"role": "user", "content": "When did it air?"},
        {"role": "assistant", "content": "It aired in 2019."},
    ]),
    conversation("korean", [
        {"role": "user", "content": "다음 줄거리를 요약해 주세요.\n\n토끼가 달에 가는 로켓을 만든다.", "input": "토끼가 달에 가는 로켓을 만든다."},
        {"role": "assistant", "content": "토끼가 직접 만든 로켓으로 달에 간다."},
    ]),
    conversation("korean-no-input", [
        {"role": "user", "content": "문 래빗은 어떤 작품인가요?"},
        {"role": "assistant", "content": "달에 가는 토끼 이야기입니다."},
    ]),
]


def golden_text(formatted: pd.DataFrame) -> str:
    """The exact rendered text of each example, then its segment mask and prompt as JSON (one per line)."""
    blocks = []
    for row in formatted.itertuples():
        text = "".join(s["text"] for s in row.segments)
        segments = "\n".join(json.dumps([s["text"], "TRAINED" if s["trained"] else "untrained"], ensure_ascii=False)
                             for s in row.segments)
        blocks.append(f"===== {row.id}\n----- text\n{text}\n----- segments\n{segments}\n----- prompt\n"
                      f"{json.dumps(row.prompt, ensure_ascii=False)}\n----- reference\n{json.dumps(row.reference, ensure_ascii=False)}\n")
    return "\n".join(blocks)


@pytest.fixture(scope="module")
def golden_frame():
    return pd.DataFrame(GOLDEN_CONVERSATIONS)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_golden_render(template, golden_frame, tokenizer):
    formatted, quarantined, _ = format_conversations(golden_frame, FormatConfig(template=template), tokenizer)
    assert len(quarantined) == 0
    actual = golden_text(formatted)
    path = GOLDEN / f"{template}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(actual, encoding="utf-8")
    assert path.exists(), f"{path} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert actual == path.read_text(encoding="utf-8"), f"{template} render changed; if intended, run UPDATE_GOLDEN=1"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_segments_are_the_text_and_prompt_precedes_final_answer(template, golden_frame, tokenizer):
    formatted, _, _ = format_conversations(golden_frame, FormatConfig(template=template, system_prompt="Be kind."), tokenizer)
    for row in formatted.itertuples():
        text = "".join(s["text"] for s in row.segments)
        assert text.startswith(row.prompt)
        final = [s for s in row.segments if s["trained"]][-1]["text"]
        # The final trained segment is the answer (plus a lead space for llama2) and its end marker / EOS.
        assert row.reference in final and final.rstrip().endswith(("<|im_end|>",)), final
        n_answers = sum(m["role"] == "assistant" for m in row.messages)
        assert sum(s["trained"] for s in row.segments) == n_answers  # every assistant turn is trained


def test_korean_template_is_exact(tokenizer):
    frame = pd.DataFrame(GOLDEN_CONVERSATIONS[2:])
    formatted, _, _ = format_conversations(frame, FormatConfig(template="ko_instruction"), tokenizer)
    with_input, without_input = formatted["prompt"].tolist()
    assert with_input == ("아래는 문제를 설명하는 지시사항과, 구체적인 답변을 방식을 요구하는 입력이 함께 있는 문장입니다. 이 요청에 대해 "
                          "적절하게 답변해주세요.\n###입력:토끼가 달에 가는 로켓을 만든다.\n###지시사항:다음 줄거리를 요약해 주세요.\n###답변:")
    assert without_input == "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n###지시사항:문 래빗은 어떤 작품인가요?\n###답변:"


def test_chat_template_prompt_is_the_generation_prompt(golden_frame, tokenizer):
    formatted, _, stats = format_conversations(golden_frame, FormatConfig(), tokenizer)
    assert stats["chat_template_render"] == "fast"
    for row in formatted.itertuples():
        messages = list(row.messages)
        assert row.prompt == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert "".join(s["text"] for s in row.segments) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_fast_render_equals_per_example_render(tokenizer):
    template = build_template("chat_template", tokenizer)
    assert template.fast
    for messages in PROBE_CONVERSATIONS + [c["messages"] for c in GOLDEN_CONVERSATIONS]:
        messages = [{k: v for k, v in m.items() if k != "input"} for m in messages]
        assert template.render(messages) == template.render_slow(messages)


def test_inconsistent_chat_template_falls_back_to_per_example(tokenizer):
    """A template that trims contents cannot be built by concatenation: the probes catch it."""
    import copy

    trimming = copy.copy(tokenizer)
    trimming.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = build_template("chat_template", trimming)
    assert not template.fast
    rendered = template.render([{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yes "}])
    assert rendered.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    assert [t for t, trained in rendered.segments if trained] == ["yes<|im_end|>"]


def test_data_sample_mismatch_switches_to_per_example(tokenizer):
    """Content the probes did not foresee (here: a template that special-cases a word) is caught on the data sample."""
    import copy

    special = copy.copy(tokenizer)
    special.chat_template = tokenizer.chat_template.replace(
        "message['content']", "(message['content'] | replace('Moon', 'MOON'))")
    frame = pd.DataFrame(GOLDEN_CONVERSATIONS[:2])
    formatted, _, stats = format_conversations(frame, FormatConfig(), special)
    assert stats["chat_template_render"] == "per_example"
    assert formatted["prompt"].iloc[1] == special.apply_chat_template(
        list(formatted["messages"].iloc[1])[:-1], tokenize=False, add_generation_prompt=True)


def test_system_prompt_is_added_only_when_missing(tokenizer):
    frame = pd.DataFrame(GOLDEN_CONVERSATIONS[:2])
    formatted, _, _ = format_conversations(frame, FormatConfig(template="chatml", system_prompt="Default."), tokenizer)
    first, second = formatted["prompt"].tolist()
    assert "Default." not in first and "You are an anime catalog assistant." in first
    assert second.startswith("<|im_start|>system\nDefault.<|im_end|>\n")


def test_text_kind_is_raw_content_plus_eos_all_trained(tokenizer):
    frame = pd.DataFrame([conversation("t", [{"role": "assistant", "content": "Once upon a time."}], kind="text")])
    for template in TEMPLATES:
        formatted, _, _ = format_conversations(frame, FormatConfig(template=template, system_prompt="S"), tokenizer)
        assert list(formatted["segments"].iloc[0]) == [{"text": "Once upon a time.<|im_end|>", "trained": True}]


def test_unrenderable_rows_are_quarantined_not_dropped(tokenizer):
    frame = pd.DataFrame([
        GOLDEN_CONVERSATIONS[1],
        conversation("bad", [{"role": "user", "content": "q"}, {"role": "system", "content": "late system"},
                             {"role": "assistant", "content": "a"}]),
    ])
    formatted, quarantined, stats = format_conversations(frame, FormatConfig(template="alpaca"), tokenizer)
    assert formatted["id"].tolist() == ["multi-turn"]
    assert quarantined["reason"].str.startswith("render_failed").tolist() == [True]
    assert stats["render_failed"] == 1


def test_bos_written_once_for_tokenizers_that_add_it(tokenizer):
    """A BOS-adding tokenizer gets BOS as text exactly once, also when the template writes it itself."""
    from loraflow.templates.base import TokenizerFacts
    from loraflow.templates.chatml import ChatML
    from loraflow.templates.llama2_chat import Llama2Chat

    facts = TokenizerFacts(eos_text="</s>", bos_text="<s>", adds_bos=True, special_texts=frozenset({"<s>", "</s>"}))
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    llama = Llama2Chat(facts).render(messages)
    assert llama.text == "<s>[INST] q [/INST] a </s>" and llama.prompt == "<s>[INST] q [/INST]"
    chatml = ChatML(facts).render(messages)
    assert chatml.text.startswith("<s><|im_start|>user") and chatml.prompt.startswith("<s><|im_start|>")


def test_run_format_writes_a_valid_artifact(tmp_path, model_dir, tokenizer):
    store = ArtifactStore(tmp_path)
    conversations, _ = enforce(pd.DataFrame(GOLDEN_CONVERSATIONS), CONVERSATIONS)
    ref = store.write(conversations, stage="synthesize", contract="conversations", schema_version=1, config_hash="x")
    result = run_format(ref, FormatConfig(), str(model_dir), store)
    assert result.rows_out == 4 and result.rows_quarantined == 0 and result.stats["unaccounted_rows"] == 0
    formatted = store.read(result.output)
    enforce(formatted, FORMATTED)
    assert isinstance(build_template("chat_template", tokenizer), ChatTemplate)




def test_cache_key_covers_the_template_code():
    """Editing a template must invalidate cached format results, not only editing tasks/format.py: every
    registered template's module is in the format stage's code hash."""
    from loraflow.runtime.code_graph import covered_modules
    from loraflow.templates import TEMPLATES

    assert {template.__module__ for template in TEMPLATES.values()} <= set(covered_modules("tasks.format"))


def test_the_format_stage_in_a_fresh_process_loads_no_torch_and_the_same_tokenizer(model_dir, tmp_path):
    """Issue 15 item 10: the tokenizer is loaded without AutoConfig (which imports torch, ≈ 3-4 s per process)."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import load_tokenizer

    store = ArtifactStore(tmp_path / "store")
    frame = pd.DataFrame([conversation("one", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])])
    ref = store.write(frame, stage="synthesize", contract="conversations", schema_version=CONVERSATIONS.version, config_hash="t")
    child = ("import sys; from loraflow.config.format import FormatConfig; from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore; "
             "from tasks.format import run_format; "
             "result = run_format(ArtifactRef.model_validate_json(sys.argv[1]), FormatConfig(), sys.argv[2], ArtifactStore(sys.argv[3])); "
             "print(result.rows_out, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", child, ref.model_dump_json(), str(model_dir), store.root], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.stdout.split()[-2:] == ["1", "False"], out.stderr[-2000:]

    fast, auto = load_tokenizer(ModelConfig(base=str(model_dir))), AutoTokenizer.from_pretrained(model_dir)
    messages = GOLDEN_CONVERSATIONS[0]["messages"]
    assert type(fast) is type(auto) and fast.all_special_tokens == auto.all_special_tokens
    assert fast.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(messages, tokenize=False)
    assert fast("Moon Rabbit 月うさぎ")["input_ids"] == auto("Moon Rabbit 月うさぎ")["input_ids"]


def test_whitespace_at_turn_edges_is_kept_by_default_and_stripped_only_when_asked(tokenizer):
    code = "    return 42\n"  # a code answer whose first line is indented
    rows = pd.DataFrame([conversation("code", [{"role": "user", "content": "  Indent it?  "},
                                               {"role": "assistant", "content": code}])])
    kept, _, stats = format_conversations(rows, FormatConfig(template="chatml"), tokenizer)
    text = "".join(s["text"] for s in kept.at[0, "segments"])
    assert "<|im_start|>assistant\n    return 42\n<|im_end|>" in text and "user\n  Indent it?  <|im_end|>" in text
    assert kept.at[0, "reference"] == code and stats["turns_with_edge_whitespace_kept"] == 2
    stripped, _, stats = format_conversations(rows, FormatConfig(template="chatml", strip_whitespace=True), tokenizer)
    assert "<|im_start|>assistant\nreturn 42<|im_end|>" in "".join(s["text"] for s in stripped.at[0, "segments"])
    assert stats["whitespace_stripped_turns"] == 2
