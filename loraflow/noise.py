"""Library messages a loraflow user cannot act on, each silenced at its narrowest (one message, one place).

- peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on every
  model load; the fix belongs to peft, not to the user.
- transformers advises `dtype=torch.float32` when a GGUF file is loaded in bfloat16; loraflow's one-time
  conversion of the embedded model asks for bfloat16 on purpose (it saves a bfloat16 folder).
"""

import logging
import warnings
from contextlib import contextmanager

GGUF_LOGGER = "transformers.quantizers.quantizer_gguf"
GGUF_DTYPE_NOTICE = "Loading a GGUF checkpoint with its weights packed is fastest in float32"


def quiet_library_warnings() -> None:
    """Ignore the deprecation warnings listed in the module docstring (only those messages)."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


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
