"""Torch datasets over COCO instances files and image folders, and the batch collate.

Datasets hold only paths and parsed json (no open file handles, no decoded images), so they
pickle/fork cleanly into DataLoader workers. Augmentations come from
:mod:`castseg.data.transforms` and draw from torch's RNG, which differs per worker.

Crowd annotations (``iscrowd=1``) are not instances: they are merged into an ``"ignore"`` bool
``[H,W]`` mask (always present, all False without crowds) so losses can skip those pixels
instead of calling them background.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from castseg.data import masks as M
from castseg.data.coco_io import annotation_rle, load_coco, read_json, validate_coco
from castseg.data.images import IMAGE_EXTENSIONS, is_image_file, read_image
from castseg.data.transforms import StrongView
from castseg.errors import InputError

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]


def _strong(strong_view: bool | StrongView | None) -> StrongView | None:
    if strong_view is True:
        return StrongView()
    return strong_view or None


def _load_image(path: Path, expect_hw: tuple[int, int] | None, where: str) -> torch.Tensor:
    """Image file → float32 ``[3,H,W]`` in [0,1]; size checked against the json's."""
    arr = read_image(path)
    if expect_hw is not None and arr.shape[:2] != expect_hw:
        raise InputError(path, f"image is {arr.shape[1]}x{arr.shape[0]} (WxH) but {where} says "
                         f"{expect_hw[1]}x{expect_hw[0]}; masks would not line up")
    # PIL-backed arrays are read-only; torch wants a writable buffer (one uint8 copy, cheap).
    arr = arr if arr.flags.writeable else arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)


def _finish(sample: Sample, transform: Transform | None, strong: StrongView | None) -> Sample:
    if transform is not None:
        sample = transform(sample)
    if strong is not None:
        # After the weak transform: the strong view is the weak view recoloured, same pixel grid.
        sample["image_strong"] = strong(sample["image"], sample.get("valid"))
    return sample


class CocoInstanceDataset(Dataset):
    """Labeled instances from a COCO json.

    Item: ``{"image": float32 [3,H,W] in [0,1], "masks": bool [N,H,W], "labels": int64 [N]
    (0..C-1 in the file's category order), "ignore": bool [H,W] (crowd pixels), "valid": bool
    [H,W] (False on padding added by a transform), "image_id": int, "orig_size": (H0, W0)}``
    plus ``"image_strong"`` float32 [3,H,W] when ``strong_view`` is True (default
    :class:`StrongView`) or a StrongView instance. ``transform`` (e.g. :class:`WeakView`) maps a
    sample to a sample before the strong view is made.
    """

    def __init__(self, ann_file: str | Path, images_root: str | Path | None = None,
                 transform: Transform | None = None, strong_view: bool | StrongView = False):
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file, images_root)
        self.cat_ids: list[int] = [c["id"] for c in self.coco.categories]
        self.class_names: list[str] = [c["name"] for c in self.coco.categories]
        self.label_of: dict[int, int] = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.transform = transform
        self.strong = _strong(strong_view)

    def __len__(self) -> int:
        return len(self.coco.images)

    def load(self, index: int) -> Sample:
        """The untransformed sample of image ``index`` (position in the json's image list)."""
        rec = self.coco.images[index]
        h, w = rec["height"], rec["width"]
        image = _load_image(self.coco.image_path(rec), (h, w), f"{self.ann_file} (image id={rec['id']})")
        masks, labels = [], []
        ignore = np.zeros((h, w), bool)
        for ann in self.coco.anns_by_image[rec["id"]]:
            m = M.decode(annotation_rle(ann, rec)).astype(bool)
            if ann.get("iscrowd", 0):
                ignore |= m
            else:
                masks.append(m)
                labels.append(self.label_of[ann["category_id"]])
        return {
            "image": image,
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "ignore": torch.from_numpy(ignore),
            "valid": torch.ones((h, w), dtype=torch.bool),
            "image_id": int(rec["id"]),
            "orig_size": (h, w),
        }

    def __getitem__(self, index: int) -> Sample:
        return _finish(self.load(index), self.transform, self.strong)


def list_image_folder(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted ``/``-separated relative paths.
    Non-image files are skipped with one warning; no image at all → InputError."""
    folder = Path(folder)
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(folder)
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            (found if is_image_file(name) else skipped).append(rel)
    if skipped:
        skipped.sort()
        warnings.warn(f"{folder}: skipped {len(skipped)} non-image file(s) "
                      f"(e.g. {', '.join(skipped[:3])})", stacklevel=3)
    if not found:
        raise InputError(folder, f"no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


class UnlabeledImageDataset(Dataset):
    """Images without labels, from a COCO json (its ``images``; annotations ignored) or a folder
    (recursive, sorted; ``image_id`` = index in that order, ``file_name`` = relative path).

    Item: ``{"image": float32 [3,H,W], "image_strong": float32 [3,H,W] (same pixel grid),
    "valid": bool [H,W], "image_id": int, "file_name": str, "orig_size": (H0, W0)}``.
    ``strong_view=False`` gives ``image_strong`` equal to ``image``. ``images_root`` applies to
    json sources only.
    """

    def __init__(self, source: str | Path, images_root: str | Path | None = None,
                 transform: Transform | None = None, strong_view: bool | StrongView = True):
        source = Path(source)
        self.source = source
        self.transform = transform
        self.strong = _strong(strong_view) or StrongView.identity()
        # (image_id, file_name, path, expected (H, W) or None)
        self.items: list[tuple[int, str, str, tuple[int, int] | None]] = []
        if source.is_dir():
            # images_root is ignored for folders: file names are relative to the folder itself.
            files = list_image_folder(source)
            self.items = [(i, f, str(source / f), None) for i, f in enumerate(files)]
        elif source.is_file():
            data = read_json(source)
            if isinstance(data, dict):
                # Only the image list matters here; skip validating (possibly many) annotations.
                data = {k: v for k, v in data.items() if k != "annotations"}
            coco = validate_coco(data, source, images_root, require_annotations=False)
            self.items = [(img["id"], img["file_name"], str(coco.image_path(img)), (img["height"], img["width"]))
                          for img in coco.images]
            if not self.items:
                raise InputError(source, "lists no images")
        else:
            raise InputError(source, "not found (expected a COCO json or a folder of images)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        image_id, file_name, path, hw = self.items[index]
        image = _load_image(Path(path), hw, f"{self.source} (image id={image_id})")
        h, w = image.shape[-2:]
        sample = {"image": image, "valid": torch.ones((h, w), dtype=torch.bool), "image_id": image_id,
                  "file_name": file_name, "orig_size": (h, w)}
        return _finish(sample, self.transform, self.strong)


def list_image_inputs(spec: str | Path, images_root: str | Path | None = None
                      ) -> tuple[list[tuple[int, str, Path]], dict[str, int] | None]:
    """``(image_id, name, path)`` for every image of ``spec`` — a file, a folder (recursive,
    sorted), a glob pattern or a COCO json (its images, from ``images_root`` or the json's) — and
    the category ids by class name when it is a COCO json (else None)."""
    import glob

    path = Path(spec)
    if path.is_dir():
        return [(i, f, path / f) for i, f in enumerate(list_image_folder(path), start=1)], None
    if path.is_file() and path.suffix.lower() == ".json":
        coco = load_coco(path, images_root, require_annotations=False)
        return ([(img["id"], img["file_name"], coco.image_path(img)) for img in coco.images],
                {c["name"]: c["id"] for c in coco.categories})
    if path.is_file():
        return [(1, path.name, path)], None
    matches = sorted(m for m in glob.glob(str(spec), recursive=True) if is_image_file(m) and Path(m).is_file())
    if not matches:
        raise InputError(spec, "no images found (expected an image, a folder, a glob pattern or a COCO json)")
    return [(i, m, Path(m)) for i, m in enumerate(matches, start=1)], None


def _pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` to ``(h, w)`` at the bottom/right."""
    out = x.new_zeros((*x.shape[:-2], h, w))
    out[..., :x.shape[-2], :x.shape[-1]] = x
    return out


def collate_instances(batch: list[Sample], size_divisibility: int = 1) -> dict[str, Any]:
    """Batch samples of different sizes (pass ``functools.partial(collate_instances,
    size_divisibility=32)`` to a DataLoader for backbones that need it).

    Returns ``{"images": float32 [B,3,H,W], "valid": bool [B,H,W] (False on padding),
    "images_strong": float32 [B,3,H,W] (when the samples have it), "targets": list of B dicts}``
    where H, W are the batch maxima (rounded up to ``size_divisibility``), images are
    zero-padded bottom/right, and each target keeps every other key of its sample with
    ``"masks"`` ``[N_i,H,W]`` and ``"ignore"`` ``[H,W]`` padded to the batch size (N_i may be 0).
    """
    if not batch:
        raise ValueError("collate_instances got an empty batch")
    d = max(1, int(size_divisibility))
    H = max(s["image"].shape[-2] for s in batch)
    W = max(s["image"].shape[-1] for s in batch)
    H, W = -(-H // d) * d, -(-W // d) * d
    has_strong = ["image_strong" in s for s in batch]
    if any(has_strong) and not all(has_strong):
        raise ValueError("some samples in the batch have 'image_strong' and some do not")
    out: dict[str, Any] = {
        "images": torch.stack([_pad_to(s["image"], H, W) for s in batch]),
        "valid": torch.stack([
            _pad_to(s["valid"] if "valid" in s else torch.ones(s["image"].shape[-2:], dtype=torch.bool), H, W)
            for s in batch]),
    }
    if all(has_strong):
        out["images_strong"] = torch.stack([_pad_to(s["image_strong"], H, W) for s in batch])
    targets = []
    for s in batch:
        t = {k: v for k, v in s.items() if k not in ("image", "image_strong", "valid")}
        for key in ("masks", "ignore"):
            if key in t:
                t[key] = _pad_to(t[key], H, W)
        targets.append(t)
    out["targets"] = targets
    return out
