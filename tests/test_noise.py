"""Library messages a user cannot act on stay off the console (issue 15 item 11); everything else still shows."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import warnings, loraflow
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    import loraflow.noise; loraflow.noise.quiet_library_warnings()
    model.is_gradient_checkpointing  # what peft reads on every get_peft_model / PeftModel load
    warnings.warn("another FutureWarning", FutureWarning)
print(sorted(str(w.message)[:40] for w in caught))
"""


def test_the_is_gradient_checkpointing_deprecation_is_silenced_and_other_warnings_are_not():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "['another FutureWarning']", done.stdout + done.stderr[-2000:]


def test_the_gguf_float32_advice_is_dropped_only_inside_our_conversion(capfd):
    from transformers.quantizers import quantizer_gguf
    from transformers.utils import logging as hf_logging

    from loraflow.noise import GGUF_DTYPE_NOTICE, gguf_dtype_notice_dropped

    hf_logging.enable_default_handler()
    message = f"{GGUF_DTYPE_NOTICE}, and this one was asked for in torch.bfloat16."
    with gguf_dtype_notice_dropped():
        quantizer_gguf.logger.warning(message)
        quantizer_gguf.logger.warning("some other GGUF warning")
    quantizer_gguf.logger.warning(message)
    printed = capfd.readouterr().err
    assert printed.count(GGUF_DTYPE_NOTICE) == 1 and "some other GGUF warning" in printed
