"""The pseudo-label cache on disk: its paths, its manifest, and reading it at a score threshold
(see :mod:`castseg.pseudo_labels`)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from castseg.data import masks as M
from castseg.data.coco_io import read_json
from castseg.data.dataset import UnlabeledImageDataset
from castseg.data.split import sha256_file
from castseg.data.transforms import StrongView
from castseg.errors import InputError
from castseg.pseudo_labels.clean import Cleanup, clean_instances

FORMAT = "castseg-pseudo-labels"
# What must match for a pass to resume, or for a finished cache to count as done.
IDENTITY_KEYS = ("teacher_sha256", "images_sha256", "class_names", "categories", "min_score", "max_size", "chunk_size")


# Files beside the cache ``P.json``: ``P.json.manifest.json`` and, while a pass runs, ``P.json.parts/``.
COMPANIONS = (".manifest.json", ".parts")


def manifest_path(out: str | Path) -> Path:
    return Path(str(out) + COMPANIONS[0])


def parts_dir(out: str | Path) -> Path:
    return Path(str(out) + COMPANIONS[1])


def images_sha256(source: Path, ds: UnlabeledImageDataset) -> str:
    """sha256 of the images json, or of a folder's file names and sizes."""
    if source.is_file():
        return sha256_file(source)
    # A folder: names and byte sizes (hashing 100k images' pixels would cost as much as a pass).
    h = hashlib.sha256()
    for _, name, path, _ in ds.items:
        h.update(f"{name}\t{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the cache ``path``; an unfinished pass is an error saying how to resume."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise InputError(path, f"no pseudo-label manifest ({mpath.name}); write the cache with `castseg pseudo-label`")
    m = read_json(mpath)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(mpath, f"not a castseg pseudo-label manifest (format != {FORMAT!r})")
    if not m.get("finished"):
        raise InputError(path, "pseudo-labelling did not finish; rerun `castseg pseudo-label` with the same "
                         "arguments to resume it")
    return m


def load_pseudo_labels(path: str | Path, images: str | Path | None = None, score_threshold: float = 0.3,
                       max_per_image: int | None = None, images_root: str | Path | None = None
                       ) -> dict[int, dict[str, list]]:
    """Cached pseudo-labels at a score threshold: ``{image_id: {"masks": [RLE], "scores":
    [float], "category_ids": [int]}}`` by descending score, at most ``max_per_image`` each.
    With ``images`` (the set that was labelled) every image of it gets an entry, possibly empty,
    and a record for an unknown image is an error."""
    manifest = read_manifest(path)
    ids: list[int] | None = None
    if images is not None:
        ds = UnlabeledImageDataset(images, images_root, strong_view=False)
        ids = [it[0] for it in ds.items]
        if manifest.get("images_sha256") != images_sha256(Path(images), ds):
            warnings.warn(f"{images} changed since {path} was generated (sha256 differs)", stacklevel=2)
    records = read_json(path)
    if not isinstance(records, list):
        raise InputError(path, "not a COCO results list")
    out: dict[int, dict[str, list]] = {i: {"masks": [], "scores": [], "category_ids": []} for i in ids or []}
    cat_ids = {c["id"] for c in manifest["categories"]}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {"image_id", "category_id", "score", "segmentation"} <= set(r):
            raise InputError(path, f"record #{i}: needs image_id, category_id, score and segmentation")
        if r["score"] < score_threshold:
            continue
        if ids is not None and r["image_id"] not in out:
            raise InputError(path, f"record #{i}: image_id {r['image_id']!r} is not an image of {images}")
        if r["category_id"] not in cat_ids:
            raise InputError(path, f"record #{i}: category_id {r['category_id']!r} is not in the manifest")
        entry = out.setdefault(r["image_id"], {"masks": [], "scores": [], "category_ids": []})
        entry["masks"].append(r["segmentation"])
        entry["scores"].append(float(r["score"]))
        entry["category_ids"].append(r["category_id"])
    for entry in out.values():
        order = sorted(range(len(entry["scores"])), key=lambda j: -entry["scores"][j])[:max_per_image]
        for key in entry:
            entry[key] = [entry[key][j] for j in order]
    return out


class PseudoLabeledDataset(Dataset):
    """Unlabeled images with cached teacher instances as targets, shaped like
    :class:`~castseg.data.dataset.CocoInstanceDataset` items: ``image`` float32 [3,H,W],
    ``masks`` bool [N,H,W], ``labels`` int64 [N] (index into the manifest's categories = the
    images json's order), ``ignore`` / ``valid`` bool [H,W], ``image_id``, ``orig_size``, plus
    ``scores`` float32 [N] (teacher scores) and ``weights`` float32 [N] (the scores with
    ``weight_by_score``, else ones: per-instance loss weights), and ``image_strong`` when
    ``strong_view``. Instances with score < ``score_threshold`` are dropped, the rest cleaned by
    ``cleanup`` (:mod:`castseg.pseudo_labels.clean`) before the transform."""

    def __init__(self, images: str | Path, pseudo_labels: str | Path, score_threshold: float = 0.3,
                 transform: Callable[[dict], dict] | None = None, strong_view: bool | StrongView = False,
                 weight_by_score: bool = False, images_root: str | Path | None = None,
                 max_per_image: int | None = None, cleanup: Cleanup = Cleanup()):
        self.pseudo_labels = Path(pseudo_labels)
        self.cleanup = cleanup
        self.base = UnlabeledImageDataset(images, images_root, strong_view=False)
        self.labels = load_pseudo_labels(pseudo_labels, images, score_threshold, max_per_image, images_root)
        cats = read_manifest(pseudo_labels)["categories"]
        self.cat_ids = [c["id"] for c in cats]
        self.class_names = [c["name"] for c in cats]
        self.label_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.transform, self.weight_by_score = transform, weight_by_score
        self.strong = StrongView() if strong_view is True else (strong_view or None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.base[index]
        sample.pop("image_strong", None)
        h, w = sample["orig_size"]
        entry = self.labels[sample["image_id"]]
        for rle in entry["masks"]:
            if list(rle.get("size", [])) != [h, w]:
                raise InputError(self.pseudo_labels, f"image id={sample['image_id']}: mask size {rle.get('size')} "
                                 f"is not the image's [{h}, {w}]")
        masks, source = clean_instances(np.stack([M.decode(rle).astype(bool) for rle in entry["masks"]])
                                        if entry["masks"] else np.zeros((0, h, w), dtype=bool), self.cleanup)
        scores = torch.tensor(entry["scores"], dtype=torch.float32)[torch.from_numpy(source)]
        labels = torch.tensor([self.label_of[c] for c in entry["category_ids"]], dtype=torch.int64)
        sample.update(masks=torch.from_numpy(masks), labels=labels[torch.from_numpy(source)],
                      ignore=torch.zeros(h, w, dtype=torch.bool), ann_ids=torch.arange(len(masks)))
        if self.transform is not None:
            # Transforms drop instances that leave the crop and keep "ann_ids" aligned with them.
            sample = self.transform(sample)
        keep = sample.pop("ann_ids")
        sample["scores"] = scores[keep]
        sample["weights"] = sample["scores"].clone() if self.weight_by_score else torch.ones(len(keep))
        if self.strong is not None:
            sample["image_strong"] = self.strong(sample["image"], sample.get("valid"))
        return sample
