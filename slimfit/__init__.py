"""slimfit: full fine-tuning of transformer models in a fraction of the accelerator memory."""

from slimfit import ops
from slimfit._version import __version__

__all__ = ["__version__", "ops"]
