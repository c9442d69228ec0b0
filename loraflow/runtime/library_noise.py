"""Library messages a loraflow user cannot act on, each silenced at its narrowest (one message, one place).

- peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on every
  model load; the fix belongs to peft, not to the user.
- transformers advises `dtype=torch.float32` when a GGUF file is loaded in bfloat16; loraflow's one-time
  conversion of the embedded model asks for bfloat16 on purpose (it saves a bfloat16 folder).
- bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch a 4-bit kernel from the Hub with the optional
  `kernels` package and warns on every run when it cannot (offline, or not installed); it falls back to its own
  kernel, and nothing in loraflow's CPU path uses 4-bit (a `4bit` config trains unquantized on a CPU).
"""

import logging
import warnings
from contextlib import contextmanager

GGUF_LOGGER = "transformers.quantizers.quantizer_gguf"
GGUF_DTYPE_NOTICE = "Loading a GGUF checkpoint with its weights packed is fastest in float32"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def quiet_library_warnings() -> None:
    """Ignore the deprecation warning and drop the bitsandbytes notice listed in the module docstring (only those)."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    bnb_logger = logging.getLogger(BNB_CPU_LOGGER)  # the same logger object bitsandbytes gets when imported later
    if not any(isinstance(f, DropMessage) and f.prefix == BNB_KERNELS_NOTICE for f in bnb_logger.filters):
        bnb_logger.addFilter(DropMessage(BNB_KERNELS_NOTICE))


class DropMessage(logging.Filter):
    """A logger filter that drops records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def gguf_dtype_notice_dropped():
    """While loading a GGUF file in bfloat16 on purpose: no advice to load it in float32."""
    logger, drop = logging.getLogger(GGUF_LOGGER), DropMessage(GGUF_DTYPE_NOTICE)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
