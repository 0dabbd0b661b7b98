"""Predictors: one interface over a castseg checkpoint, a teacher folder, or an ONNX file.

``load_predictor(path)`` returns a :class:`Predictor` whose ``__call__(images [B,3,H,W] float
in [0,1]) -> list[{"masks" bool [K,H,W], "scores" [K], "labels" int64 [K]}]`` is what
`castseg predict`, `castseg bench` and evaluation call, so every runtime goes through the same
post-processing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from castseg.errors import CastsegError
from castseg.models.inference import postprocess_instances


class Predictor:
    """Base: ``class_names``, ``kind`` and a batched ``__call__``."""

    kind = "model"
    class_names: list[str]

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def num_parameters(self) -> int | None:
        """Parameters of the model behind it (None where the runtime does not say)."""
        return None

    def gflops(self, images: torch.Tensor) -> float | None:
        """GFLOPs of the network's forward on ``images`` (None where it cannot be counted)."""
        return None


class StudentPredictor(Predictor):
    """A student-architecture checkpoint (the student, or a `large`-preset teacher)."""

    kind = "student"

    def __init__(self, model: torch.nn.Module, class_names: list[str], topk: int = 100,
                 mask_threshold: float = 0.5, score_threshold: float = 0.0, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.class_names, self.device = class_names, device
        self.post = dict(topk=topk, mask_threshold=mask_threshold, score_threshold=score_threshold)

    def num_parameters(self) -> int | None:
        return sum(p.numel() for p in self.model.parameters())

    def gflops(self, images: torch.Tensor) -> float | None:
        from castseg.models.sizes import forward_flops

        return forward_flops(lambda: self.model(images.to(self.device))) / 1e9

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pred_logits [B,Q,C+1]``, ``pred_masks [B,Q,Hp/4,Wp/4]`` of the final layer."""
        with torch.no_grad():
            out = self.model(images.to(self.device))
        return out["pred_logits"], out["pred_masks"]

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        logits, masks = self.raw(images)
        sizes = [tuple(images.shape[-2:])] * len(images)
        return postprocess_instances(logits, masks, sizes, sizes, **self.post)


class OnnxPredictor(StudentPredictor):
    """An exported student run by onnxruntime, with the same post-processing as torch."""

    kind = "onnx"

    def __init__(self, path: str | Path, class_names: list[str], topk: int = 100, mask_threshold: float = 0.5,
                 score_threshold: float = 0.0, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else \
            ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise CastsegError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self.class_names, self.device = class_names, "cpu"
        self.post = dict(topk=topk, mask_threshold=mask_threshold, score_threshold=score_threshold)

    def num_parameters(self) -> int | None:
        return None

    def gflops(self, images: torch.Tensor) -> float | None:
        return None

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, masks = self.session.run(["pred_logits", "pred_masks"], {"images": images.cpu().numpy()})
        return torch.from_numpy(logits), torch.from_numpy(masks)


class TeacherPredictor(Predictor):
    """Any :class:`castseg.models.teacher.Teacher` (zero-shot or adapted grounded-SAM, ensembles)."""

    kind = "teacher"

    def __init__(self, teacher: Any, class_names: list[str], score_threshold: float = 0.0, device: str = "cpu"):
        self.teacher = teacher.to(device).eval()
        self.class_names, self.device, self.score_threshold = class_names, device, score_threshold

    def num_parameters(self) -> int | None:
        return sum(p.numel() for p in self.teacher.parameters())

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = self.teacher.predict(images.to(self.device), self.class_names)
        if self.score_threshold > 0:
            out = [{k: v[r["scores"] >= self.score_threshold] for k, v in r.items()} for r in out]
        return out


def onnx_class_names(path: Path) -> list[str]:
    """Class names stored in the ONNX file's metadata by `castseg export`."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CastsegError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta.get("class_names", "[]")) or ["object"]


def load_predictor(path: str | Path, onnx: bool = False, device: str = "auto", topk: int = 100,
                   score_threshold: float = 0.0, threads: int | None = None) -> Predictor:
    """A checkpoint folder/json (student), a teacher folder (``teacher.json`` / ``teacher.yaml``)
    or, with ``onnx``, an exported ``.onnx`` file. ``device``: "auto" is this process's GPU
    when there is one, else the CPU."""
    from castseg.device import resolve_device

    device = str(resolve_device(str(device)))
    path = Path(path)
    if not path.exists():
        raise CastsegError(f"{path}: not found")
    if onnx or path.suffix == ".onnx":
        return OnnxPredictor(path, onnx_class_names(path), topk=topk, score_threshold=score_threshold,
                             threads=threads)
    if path.is_dir() and ((path / "teacher.json").is_file() or (path / "teacher.yaml").is_file()):
        from castseg.pseudo_labels.teacher_spec import load_teacher

        teacher, _ = load_teacher(path, device=device, fingerprint=False)
        return TeacherPredictor(teacher, teacher.resolve_class_names(None), score_threshold, device)
    from castseg.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path, device=device)
    return StudentPredictor(model, list(meta["class_names"]), topk=topk, score_threshold=score_threshold, device=device)


def resize_for_model(image: np.ndarray, max_size: int | None) -> torch.Tensor:
    """``uint8 [H,W,3]`` → float ``[3,h,w]`` in [0,1], longest side ≤ ``max_size`` (aspect kept)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
    h, w = x.shape[-2:]
    if max_size and max(h, w) > max_size:
        s = max_size / max(h, w)
        x = torch.nn.functional.interpolate(x[None], size=(max(1, round(h * s)), max(1, round(w * s))),
                                            mode="bilinear", align_corners=False, antialias=True)[0]
    return x
