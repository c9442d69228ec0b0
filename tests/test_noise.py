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
    import loraflow.runtime.library_noise; loraflow.runtime.library_noise.quiet_library_warnings()
    model.is_gradient_checkpointing  # what peft reads on every get_peft_model / PeftModel load
    warnings.warn("another FutureWarning", FutureWarning)
print(sorted(str(w.message)[:40] for w in caught))
"""


def test_the_is_gradient_checkpointing_deprecation_is_silenced_and_other_warnings_are_not():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "['another FutureWarning']", done.stdout + done.stderr[-2000:]


def test_the_gguf_float32_advice_is_dropped_only_inside_our_conversion():
    import io
    import logging

    from transformers.quantizers import quantizer_gguf

    from loraflow.runtime.library_noise import GGUF_DTYPE_NOTICE, gguf_dtype_notice_dropped

    # Our own handler: transformers' default one keeps whichever stderr it first saw (pytest's, under xdist).
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)
    quantizer_gguf.logger.addHandler(handler)
    try:
        message = f"{GGUF_DTYPE_NOTICE}, and this one was asked for in torch.bfloat16."
        with gguf_dtype_notice_dropped():
            quantizer_gguf.logger.warning(message)
            quantizer_gguf.logger.warning("some other GGUF warning")
        quantizer_gguf.logger.warning(message)
    finally:
        quantizer_gguf.logger.removeHandler(handler)
    assert printed.getvalue().count(GGUF_DTYPE_NOTICE) == 1 and "some other GGUF warning" in printed.getvalue()


BNB_CHILD = """
import logging, sys
import loraflow
from loraflow.runtime.library_noise import BNB_CPU_LOGGER, BNB_KERNELS_NOTICE
logger = logging.getLogger(BNB_CPU_LOGGER)  # what bitsandbytes.backends.cpu.ops logs with
logger.addHandler(logging.StreamHandler(sys.stdout))
logger.warning(BNB_KERNELS_NOTICE + ": %s. Please make sure you already `pip install kernels`", "No module named 'kernels'")
logger.warning("another bitsandbytes warning")
import bitsandbytes  # on an AVX512-BF16 CPU without `kernels` this is where the notice comes from
"""


def test_the_bitsandbytes_kernels_notice_is_dropped_and_other_bitsandbytes_warnings_are_not():
    done = subprocess.run([sys.executable, "-c", BNB_CHILD], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "another bitsandbytes warning", done.stdout + done.stderr[-2000:]
    assert "kernels-community" not in done.stderr, done.stderr[-2000:]
