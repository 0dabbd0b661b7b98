"""castseg: CAST semi-supervised distillation for instance segmentation."""

__version__ = "0.1.0"

# Messages go through the `castseg` logger. As a library castseg only adds a NullHandler: the
# program decides where they go. The `castseg` CLI (and a script calling castseg.console.install())
# shows them on stderr (see castseg.console).
import logging as _logging  # noqa: E402

_logging.getLogger("castseg").addHandler(_logging.NullHandler())
