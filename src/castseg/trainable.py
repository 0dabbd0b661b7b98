"""What a stage needs of the model it trains: :class:`Trainable`.

A stage (:mod:`castseg.stages`) never asks what kind of model it holds. :func:`trainable_for`
decides it here, where training policy lives (models do not import training code): the student
and a student-architecture teacher (:class:`~castseg.models.teacher.ModelTeacher`) give a
:class:`CastTrainable`
(CAST's objective J, the student evaluator, the engine's checkpoint is the model); any other
:class:`~castseg.models.teacher.Teacher` (Grounding DINO + SAM2, an ensemble, ...) gives a
:class:`TeacherTrainable` (its own ``loss``, evaluation through its ``predict``, saved with its
own ``save_pretrained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

from castseg.config_sections import LossConfig
from castseg.errors import CastsegError
from castseg.objective import pad_to, stack_padded

if TYPE_CHECKING:
    from castseg.config import RunConfig

LossFn = Callable[[nn.Module, dict[str, Any], int], dict[str, torch.Tensor]]
EvaluateFn = Callable[[nn.Module], dict[str, float]]


class Trainable(Protocol):
    """A model as a stage trains it."""

    supports_pxl: bool  # False: L_pxl needs pixel embeddings the model does not have; λ_pxl is 0
    saves: bool  # True: save() writes the trained model in its own format (else the engine's checkpoint is it)

    def module(self) -> nn.Module:
        """What the engine optimises, wraps in DDP and checkpoints."""

    def loss_fn(self, class_names: list[str], loss: LossConfig, lambda_semi: float, lambda_pxl: float) -> LossFn:
        """``loss_fn(module, batches, step) -> {"loss", <terms>}`` for the engine."""

    def evaluator(self, cfg: RunConfig) -> EvaluateFn | None:
        """Val metrics of the trained module (None without ``data.val``)."""

    def save(self, trained: nn.Module, folder: Path) -> Path | None:
        """The trained model in a form ``castseg.load`` / ``load_model`` read; None when the
        engine's checkpoint already is one."""


def val_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``evaluate_model`` options of a run's ``eval`` section."""
    from castseg.engine.data import loader_settings
    from castseg.device import resolve_device

    ev = cfg.eval
    workers = loader_settings(cfg.train.num_workers, resolve_device(cfg.train.device))["num_workers"]
    return dict(max_dets=ev.max_dets, batch_size=ev.batch_size, topk=ev.topk, max_size=cfg.val_max_size,
                images_root=cfg.data.images_root, num_workers=workers)


class CastTrainable:
    """A student-architecture network (the student; a checkpoint teacher) trained on CAST's J."""

    supports_pxl = True
    saves = False

    def __init__(self, network: nn.Module):
        self.network = network

    def module(self) -> nn.Module:
        return self.network

    def loss_fn(self, class_names: list[str], loss: LossConfig, lambda_semi: float, lambda_pxl: float) -> LossFn:
        from castseg.objective import build_objective

        objective = build_objective(len(class_names), loss, lambda_semi, lambda_pxl)

        def run(m: nn.Module, batches: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
            return objective(m, batches.get("labeled"), batches.get("unlabeled"), step=step)

        return run

    def evaluator(self, cfg: RunConfig) -> EvaluateFn | None:
        from castseg.evaluate import make_evaluator

        return make_evaluator(cfg.data.val, **val_kwargs(cfg)) if cfg.data.val else None

    def save(self, trained: nn.Module, folder: Path) -> Path | None:
        return None


class TeacherTrainable:
    """Any :class:`~castseg.models.teacher.Teacher` trained through its own ``loss`` on the
    labeled and pseudo-labelled batches (for Grounding DINO + SAM2: its detection loss + SAM2
    mask BCE/Dice). L_pxl does not apply: no pixel embeddings.

    The labeled and pseudo-labelled crops go through the teacher as **one** batch: one
    gradient-carrying forward per step, which DistributedDataParallel needs (two forwards mark
    parameters ready twice when one of them leaves a part unused), and one graph alive until
    backward instead of two. The teacher's loss then normalises over the instances of both
    (stage 1c weighs pseudo-labels as labels, λ_semi = 1; λ_semi = 0 leaves them out)."""

    supports_pxl = False
    saves = True

    def __init__(self, teacher: Any):
        self.teacher = teacher

    def module(self) -> nn.Module:
        return self.teacher

    def loss_fn(self, class_names: list[str], loss: LossConfig, lambda_semi: float, lambda_pxl: float) -> LossFn:
        if lambda_semi not in (0.0, 1.0):
            raise CastsegError(f"a {type(self.teacher).__name__} teacher adapts on labeled and pseudo-labelled "
                               f"crops as one batch: λ_semi must be 0 or 1, got {lambda_semi}")

        def run(m: nn.Module, batches: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
            used = [b for key, b in batches.items() if key != "unlabeled" or lambda_semi > 0]
            images = stack_padded([b["images"] for b in used])
            h, w = images.shape[-2:]
            targets = [{"labels": t["labels"], "masks": pad_to(t["masks"], h, w, False)}
                       for b in used for t in b["targets"]]
            out = m(images, targets, class_names)  # Teacher.forward is its loss; DDP hooks it
            return {"loss": out["loss"], **{k: v.detach() for k, v in out.items() if k != "loss"}}

        return run

    def evaluator(self, cfg: RunConfig) -> EvaluateFn | None:
        from castseg.evaluate import evaluate_model, predictor_instances

        if not cfg.data.val:
            return None
        kwargs = val_kwargs(cfg)
        del kwargs["topk"]  # the teacher's own max_detections applies

        def run(m: nn.Module) -> dict[str, float]:
            return evaluate_model(predictor_instances(m.predict), cfg.data.val, **kwargs)

        return run

    def save(self, trained: nn.Module, folder: Path) -> Path | None:
        return trained.save_pretrained(folder)


def trainable_for(teacher: nn.Module) -> Trainable:
    """How a stage trains ``teacher``: a student-architecture one (``ModelTeacher``) on CAST's J
    like the student (METHOD.md); any other on its own ``loss``."""
    from castseg.models.teacher import ModelTeacher

    if isinstance(teacher, ModelTeacher):
        return CastTrainable(teacher.model)
    return TeacherTrainable(teacher)
