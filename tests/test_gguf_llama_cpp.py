"""The published GGUF in llama.cpp (llama-cpp-python, where installed; CI skips: it is a source-only build):
a trained question gets transformers' greedy answer, word for word, and stops on its own. The real SmolLM2-135M
(a tiny random model does not learn an answer through LoRA in a test's time)."""

import pytest

from tests.tiny_llama import QA_ROWS, SYSTEM_PROMPT, tokens_frame

pytestmark = pytest.mark.slow


def test_the_gguf_answers_a_trained_question_as_transformers_does_and_stops(tmp_path, model_dir):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (source build; README)")
    from transformers import AutoTokenizer

    from loraflow.config.publish import GGUFConfig, PublishConfig
    from loraflow.config.train import TrainConfig
    from loraflow.modeling.inference import ask
    from loraflow.publishing.llama_cpp import llama_cpp_answer
    from tasks.publish import publish_model
    from tasks.train import train_adapter
    from tests.test_publish import card_facts

    question, answer = QA_ROWS[0][0], QA_ROWS[0][1]
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir), rows=[QA_ROWS[0]] * 4)
    config = TrainConfig(max_steps=20, micro_batch_size=4, learning_rate=2e-3, lr_scheduler="constant", warmup_ratio=0.0,
                         lora_dropout=0.0, checkpoint_every=1000)
    trained = train_adapter(tokens, model_dir, config, tmp_path / "train")
    published = publish_model(model_dir, trained.adapter_dir, PublishConfig(gguf=GGUFConfig(quantization="f16")),
                              tmp_path / "out", card=card_facts(), verify_texts=[tokens["prompt"][0] + answer],
                              system_prompt=SYSTEM_PROMPT)

    in_transformers = ask(tmp_path / "out" / "model", question, stream=False, max_new_tokens=48)
    assert in_transformers == answer  # memorised: the comparison below is between two runs of a known answer
    in_llama_cpp, finish_reason = llama_cpp_answer(published.gguf_file, question, system_prompt=SYSTEM_PROMPT, max_tokens=48)
    assert in_llama_cpp == in_transformers
    assert finish_reason == "stop"  # ended on the GGUF's end-of-turn id, not on the token budget
