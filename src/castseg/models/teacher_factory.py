"""The one place teachers are constructed: :func:`build_teacher` (a typed ``teacher:`` spec,
or its mapping, → a :class:`~castseg.models.teacher.Teacher`).

``castseg run`` / ``adapt`` (θ_T⁰) and everything that loads a model from a path
(:func:`castseg.models.loading.load_model`, which turns a path into a spec: ``pseudo-label``,
``predict``, ``bench``, the report, ``castseg.load``) end here. The teacher modules
themselves (teacher.py, grounded_sam.py, tta.py) never import this one, so there is no cycle.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import TypeAdapter, ValidationError

from castseg.config_sections import (CheckpointTeacherSpec, EnsembleTeacherSpec, GroundedSamTeacherSpec,
                                     OnnxTeacherSpec, TeacherSpec, TTATeacherSpec, describe_error)
from castseg.errors import CastsegError
from castseg.models.teacher import EnsembleTeacher, ModelTeacher, Teacher

_SPEC = TypeAdapter(TeacherSpec)
_SPEC_ROOT = TeacherSpec  # for the valid keys in error messages


def parse_teacher_spec(spec: Any, where: str = "teacher") -> Any:
    """A mapping (or an already typed spec) → the typed spec; one line naming the key if invalid."""
    if isinstance(spec, (CheckpointTeacherSpec, OnnxTeacherSpec, GroundedSamTeacherSpec, EnsembleTeacherSpec,
                         TTATeacherSpec)):
        return spec
    try:
        return _SPEC.validate_python(spec)
    except ValidationError as e:
        raise CastsegError(f"teacher config: {describe_error(e, where, _SPEC_ROOT)}") from None


def _checkpoint(spec: CheckpointTeacherSpec) -> Teacher:
    from castseg.device import resolve_device
    from castseg.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(spec.path, device=resolve_device(spec.device))
    return ModelTeacher(model, spec.class_names or meta["class_names"], postprocess_kwargs=spec.postprocess_kwargs)


def _onnx(spec: OnnxTeacherSpec) -> Teacher:
    from castseg.models.onnx_network import OnnxNetwork, onnx_class_names

    network = OnnxNetwork(spec.path, threads=spec.threads, cuda=spec.device.startswith("cuda"))
    return ModelTeacher(network, spec.class_names or onnx_class_names(spec.path),
                        postprocess_kwargs=spec.postprocess_kwargs)


def _grounded_sam(spec: GroundedSamTeacherSpec) -> Teacher:
    from castseg.models.grounded_sam import GroundedSAMTeacher

    if spec.path is not None:  # an adapted teacher written by save_pretrained
        return GroundedSAMTeacher.from_pretrained(spec.path, **spec.options())
    return GroundedSAMTeacher(**spec.options())


def _ensemble(spec: EnsembleTeacherSpec) -> Teacher:
    return EnsembleTeacher([build_teacher(m) for m in spec.members], weights=spec.weights,
                           mask_nms_iou=spec.mask_nms_iou, class_agnostic=spec.class_agnostic,
                           max_detections=spec.max_detections, class_names=spec.class_names)


def _tta(spec: TTATeacherSpec) -> Teacher:
    from castseg.models.tta import TTATeacher

    return TTATeacher(build_teacher(spec.member), flips=spec.flips, mask_nms_iou=spec.mask_nms_iou,
                      max_detections=spec.max_detections, class_names=spec.class_names)


_BUILDERS: dict[str, Callable[[Any], Teacher]] = {
    "checkpoint": _checkpoint, "onnx": _onnx, "grounded_sam": _grounded_sam, "ensemble": _ensemble, "tta": _tta}


def build_teacher(spec: Any) -> Teacher:
    """A teacher from its spec (see :mod:`castseg.config_sections`):

    - ``{type: checkpoint, path: P, postprocess_kwargs: {...}}``: a castseg checkpoint;
    - ``{type: onnx, path: F.onnx}``: an exported student, run by onnxruntime (predicts only);
    - ``{type: grounded_sam, detector, segmenter, ...}`` or ``{type: grounded_sam, path: DIR}``
      (a teacher saved with ``save_pretrained``; the other keys override its options);
    - ``{type: ensemble, members: [spec, ...], weights: [...], mask_nms_iou: 0.5}``;
    - ``{type: tta, member: spec, flips: [h, v]}``: the member on flipped views, fused.
    """
    spec = parse_teacher_spec(spec)
    return _BUILDERS[spec.type](spec)
