"""modeltest: accuracy evaluation for vision-language models (harness side)."""

from .errors import ModelTestError

__version__ = "0.1.0"
__all__ = ["ModelTestError", "__version__"]
