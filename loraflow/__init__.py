"""loraflow: sources -> instruction data -> tokens -> QLoRA adapter -> evaluated, merged, published model."""

__version__ = "0.1.0"

from loraflow.runtime.library_noise import quiet_library_warnings

quiet_library_warnings()
