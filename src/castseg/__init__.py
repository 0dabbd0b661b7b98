"""castseg: CAST semi-supervised distillation for instance segmentation.

The Python API (:mod:`castseg.api`), importable from here::

    import castseg

    result = castseg.run("configs/mine.yaml", "train.max_steps=200")   # all stages -> RunResult
    model = castseg.load(result.student)                               # a student, teacher or .onnx
    instances = model.predict("images/", score_threshold=0.3)          # masks at each image's size

Names are imported on first use, so ``import castseg`` stays cheap.
"""

__version__ = "0.1.0"

# Messages go through the `castseg` logger. As a library castseg only adds a NullHandler: the
# program decides where they go. The `castseg` CLI (and a script calling castseg.console.install())
# shows them on stderr (see castseg.console).
import logging as _logging  # noqa: E402

_logging.getLogger("castseg").addHandler(_logging.NullHandler())

_API = ("Instances", "Model", "RunResult", "adapt", "convert", "describe", "distill", "evaluate", "load", "plan",
        "pseudo_label", "refine", "run", "split")
__all__ = ["__version__", *_API]


def __getattr__(name: str):  # PEP 562: the API on first use (torch and friends load then, not at import)
    if name in _API:
        from castseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'castseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
