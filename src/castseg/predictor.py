"""``castseg.load(path)`` (here, re-exported by :mod:`castseg.api`): any trained model (a student checkpoint, a teacher folder of any kind,
an ONNX file) as one :class:`Model` that predicts on images as users hold them.

The model behind it is a :class:`~castseg.models.teacher.Teacher` built by the one loader
(:func:`castseg.models.loading.load_model`); :class:`Model` adds what a user needs around it:
image inputs in any common form, a resize for speed whose masks come back at the input's size,
a score threshold, ONNX export and a description.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch

from castseg.errors import CastsegError, InputError

logger = logging.getLogger(__name__)
ImageInput = Union[str, Path, np.ndarray, "PIL.Image.Image"]  # noqa: F821 - PIL is imported lazily


@dataclasses.dataclass
class Instances:
    """One image's instances, sorted by descending score.

    Attributes:
        masks: bool ``[K,H,W]`` at the input image's size.
        scores: float32 ``[K]``.
        labels: int64 ``[K]``, indices into ``class_names``.
        class_names: the model's classes.
        image: the file the image came from (None for an array or a PIL image).
    """

    masks: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    image: str | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int = 1, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """COCO result records ``{"image_id", "category_id", "score", "segmentation" (RLE),
        "bbox"}``; ``category_ids[label]`` (default ``label + 1``)."""
        from castseg.eval.results import instances_to_results

        ids = np.arange(1, len(self.class_names) + 1) if category_ids is None else np.asarray(category_ids)
        return instances_to_results(image_id, torch.from_numpy(self.masks), torch.from_numpy(self.scores),
                                    ids[self.labels].astype(np.int64))


def _as_rgb(image: Any, where: str) -> np.ndarray:
    """A PIL image or an array ``[H,W]``, ``[H,W,1|3|4]`` (uint8, uint16, float, bool) → uint8 ``[H,W,3]``."""
    from castseg.data.images import pil_array, to_rgb_uint8

    if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image: as read_image reads a file's
        image = pil_array(image)
    if not isinstance(image, np.ndarray):
        raise InputError(where, f"expected a path, a folder, a PIL image or a numpy array, got {type(image).__name__}")
    return to_rgb_uint8(image, where)


def _read_all(images: ImageInput | Iterable[ImageInput]) -> Iterable[tuple[np.ndarray, str | None]]:
    """``(uint8 [H,W,3], file name or None)`` per image of a path, a folder, a glob, a COCO json,
    an image or a list of them, read one at a time."""
    from castseg.data.dataset import list_image_inputs
    from castseg.data.images import read_image

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            for _, _, path in list_image_inputs(item)[0]:
                yield read_image(path), str(path)
        else:
            yield _as_rgb(item, f"image {i}"), None


def image_tensor(image: np.ndarray, max_size: int | None) -> torch.Tensor:
    """uint8 ``[H,W,3]`` → float ``[3,h,w]`` in [0,1], longest side ≤ ``max_size`` (aspect kept)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
    h, w = x.shape[-2:]
    if max_size and max(h, w) > max_size:
        s = max_size / max(h, w)
        x = torch.nn.functional.interpolate(x[None], size=(max(1, round(h * s)), max(1, round(w * s))),
                                            mode="bilinear", align_corners=False, antialias=True)[0]
    return x


class Model:
    """A loaded model: ``predict`` on images, ``export`` to ONNX, ``info``.

    ``kind`` is ``"student"`` (a castseg checkpoint), ``"onnx"`` or ``"teacher"`` (a teacher
    folder or config). ``network`` is the underlying :class:`~castseg.models.teacher.Teacher`,
    whose ``predict(images [B,3,H,W] float in [0,1])`` is the low-level contract.
    """

    def __init__(self, network: Any, *, source: str | Path, kind: str):
        self.network, self.source, self.kind = network, Path(source), kind
        self.class_names: list[str] = network.resolve_class_names(None)

    def __repr__(self) -> str:
        return f"castseg.Model({self.kind}: {self.source}, classes {self.class_names})"

    @property
    def device(self) -> torch.device:
        return self.network.device

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Batched tensors in, instances at the batch's size out: ``images [B,3,H,W]`` float in
        [0,1] → B dicts ``{"masks" bool [K,H,W], "scores" [K], "labels" int64 [K]}``."""
        return self.network.predict(images, self.class_names)

    def predict(self, images: ImageInput | Sequence[ImageInput], *, score_threshold: float = 0.0,
                max_size: int | None = None, max_instances: int | None = None, batch_size: int = 1
                ) -> list[Instances]:
        """Instances on each image.

        Args:
            images: a file, a folder (its images, sorted), a glob pattern, a COCO json (its
                images), a PIL image, a numpy
                array (``[H,W]``, ``[H,W,3]`` or ``[H,W,4]``; uint8, uint16 or float: >8-bit data
                is stretched per image, alpha dropped) or a list of any of these.
            score_threshold: instances scoring below it are dropped.
            max_size: the model sees the image resized so its longest side is at most this
                (faster on large images); masks still come back at the input's size.
            max_instances: keep at most this many per image (the best-scored).
            batch_size: images per forward (same-size images only are batched together).

        Returns:
            One :class:`Instances` per image, in input order (a folder's images sorted by name).

        Examples:
            >>> import numpy as np, castseg
            >>> model = castseg.load("student")             # a folder written by training
            >>> [r] = model.predict(np.zeros((48, 64), np.uint16), max_size=32)
            >>> r.masks.shape[1:], r.masks.dtype
            ((48, 64), dtype('bool'))
        """
        from itertools import islice

        stream = iter(_read_all(images))
        results: list[Instances] = []
        while chunk := list(islice(stream, max(1, batch_size))):
            results += self._predict_chunk(chunk, score_threshold, max_size, max_instances)
        return results

    def _predict_chunk(self, chunk: list[tuple[np.ndarray, str | None]], score_threshold: float,
                       max_size: int | None, max_instances: int | None) -> list[Instances]:
        """One forward per group of same-size images (padding would change what the model sees)."""
        from castseg.models.inference import resize_masks

        xs = [image_tensor(image, max_size) for image, _ in chunk]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        raw: list[Any] = [None] * len(xs)
        for idx in groups.values():
            for i, r in zip(idx, self(torch.stack([xs[i] for i in idx]).to(self.device))):
                raw[i] = r
        out = []
        for (image, name), r in zip(chunk, raw):
            keep = (r["scores"] >= score_threshold).nonzero()[:, 0][:max_instances]
            masks = resize_masks(r["masks"][keep], image.shape[:2])
            out.append(Instances(masks.cpu().numpy(), r["scores"][keep].float().cpu().numpy(),
                                 r["labels"][keep].cpu().numpy().astype(np.int64), self.class_names, name))
        return out

    def export(self, path: str | Path, *, format: str = "onnx", height: int = 512, width: int = 512,
               dynamic_size: bool = True, opset: int = 17, tolerance: float = 1e-3) -> Path:
        """Write the model as ONNX (students only), refused unless onnxruntime reproduces torch
        within ``tolerance`` on a ``height``×``width`` image; returns the file."""
        from castseg.export import export_onnx

        if format != "onnx":
            raise CastsegError(f"export format {format!r} is not supported (only 'onnx')")
        if self.kind != "student":
            raise CastsegError(f"{self.source}: only a student checkpoint exports to ONNX (this is a {self.kind})")
        r = export_onnx(self.network.model, self.class_names, path, height, width, dynamic_size=dynamic_size,
                        opset=opset, tolerance=tolerance, source=str(self.source))
        logger.info(f"exported {self.source} -> {r['path']} (opset {r['opset']}, "
                    f"{'dynamic' if r['dynamic_size'] else 'fixed'} size); parity: max |Δ| mask prob "
                    f"{r['max_abs_mask_prob']:.1e}, class prob {r['max_abs_class_prob']:.1e}, "
                    f"identical top-k {r['same_topk']}")
        return Path(r["path"])

    def num_parameters(self) -> int | None:
        """Parameters of the network (None for an ONNX file, whose runtime does not say)."""
        return None if self.kind == "onnx" else sum(p.numel() for p in self.network.parameters())

    def gflops(self, images: torch.Tensor) -> float | None:
        """GFLOPs of one forward on ``images [B,3,H,W]`` (None where it cannot be counted)."""
        if self.kind == "onnx":
            return None
        from castseg.models.sizes import forward_flops

        try:
            return forward_flops(lambda: self(images.to(self.device))) / 1e9
        except Exception:  # noqa: BLE001 - a composite teacher's counting may fail; the row then says so
            return None

    def info(self) -> dict[str, Any]:
        """``{"source", "kind", "class_names", "params", "device"}`` (plus the checkpoint's
        ``step`` and ``architecture`` for a student)."""
        out: dict[str, Any] = {"source": str(self.source), "kind": self.kind, "class_names": self.class_names,
                               "params": self.num_parameters(), "device": str(self.device)}
        if self.kind == "student" and self.source.suffix not in (".yaml", ".yml"):
            from castseg.models.checkpoint import read_checkpoint_meta

            meta = read_checkpoint_meta(self.source)[0]
            out.update(step=meta.get("step"), architecture=meta.get("architecture"))
        return out


def load(path: str | Path, *, device: str = "auto", topk: int = 100, threads: int | None = None) -> Model:
    """Load a student checkpoint (folder / ``model.json``), a teacher folder (``teacher.json`` /
    ``teacher.yaml``), a teacher config (``.yaml``) or an exported ``.onnx`` file.

    Args:
        path: what to load; what it holds is read from its files.
        device: "auto" (this process's GPU if there is one, else the CPU), "cpu", "cuda:1" ...
        topk: candidate (query, class) pairs per image of a student-architecture model.
        threads: onnxruntime threads for an ONNX file (None: its default).

    Returns:
        A :class:`Model`.

    Examples:
        >>> import castseg
        >>> model = castseg.load("student")
        >>> model.kind, model.class_names
        ('student', ['nucleus'])
    """
    from castseg.models.loading import load_model
    from castseg.models.teacher import ModelTeacher

    network, info = load_model(path, device=device, fingerprint=False, threads=threads)
    kind = info["config"].get("type") if isinstance(info["config"], dict) else None
    kind = {"checkpoint": "student", "onnx": "onnx"}.get(kind or "", "teacher")
    if isinstance(network, ModelTeacher):
        network.postprocess_kwargs["topk"] = topk
    return Model(network, source=path, kind=kind)
