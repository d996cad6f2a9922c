"""QuantSpace: quantize Hugging Face models to GGUF (and more), measure what each file keeps, publish.

    from quantspace import quantize
    report = quantize("HuggingFaceTB/SmolLM2-135M-Instruct", variants="Q4_K_M,Q8_0")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import QuantSpaceError
from .report import Report

__version__ = "0.1.0"
__all__ = ["quantize", "estimate", "Report", "QuantSpaceError", "__version__"]

if TYPE_CHECKING:
    from .estimate import estimate
    from .pipeline import quantize


def __getattr__(name: str) -> Any:
    # Lazy: `import quantspace` stays fast and does not load torch or llama.cpp.
    if name == "quantize":
        from .pipeline import quantize

        return quantize
    if name == "estimate":
        from .estimate import estimate

        return estimate
    raise AttributeError(name)
