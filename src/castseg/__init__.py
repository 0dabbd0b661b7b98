"""castseg: CAST semi-supervised distillation for instance segmentation."""

__version__ = "0.1.0"

# Messages go through the `castseg` logger, shown on stderr by default (see castseg.console).
from castseg import console as _console  # noqa: E402

_console.install()
