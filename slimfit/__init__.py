"""slimfit: full fine-tuning of transformer models in a fraction of the accelerator memory."""

from slimfit import ops
from slimfit._version import __version__
from slimfit.core import SlimFit
from slimfit.nn.column_blocks import merge_columns, split_columns

__all__ = ["SlimFit", "__version__", "merge_columns", "ops", "split_columns"]
