"""Datasets and collate: instances, crowds, aligned views, folders, workers, odd image formats."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from castseg.api.data import split
from castseg.data import masks as M
from castseg.data.dataset import CocoInstanceDataset, UnlabeledImageDataset, collate_instances
from castseg.data.transforms import StrongView, WeakView
from castseg.errors import InputError

COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # per object slot: unique colours


def build_coco(root: Path, sizes=((32, 40), (24, 30), (32, 40))) -> Path:
    """COCO json in ``root`` with categories listed as ids [5, 2] (→ labels 0, 1).

    Image 0: red object (cat 5), green object (cat 2), crowd region (cat 2) at the bottom.
    Image 1: no annotations. Image 2: one blue object (cat 5). Background grey.
    """
    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []

    def add(img_id: int, m: np.ndarray, cat: int, crowd: int = 0) -> None:
        anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                     "segmentation": M.encode(m), "iscrowd": crowd})

    for i, (h, w) in enumerate(sizes):
        img = np.full((h, w, 3), 128, np.uint8)
        objs = []
        if i == 0:
            objs = [((2, 12, 3, 15), 5, 0, 0), ((14, 22, 20, 36), 2, 1, 0), ((26, 32, 0, 40), 2, None, 1)]
        elif i == 2:
            objs = [((5, 20, 5, 20), 5, 2, 0)]
        for (y0, y1, x0, x1), cat, colour, crowd in objs:
            m = np.zeros((h, w), np.uint8)
            m[y0:y1, x0:x1] = 1
            if colour is not None:
                img[m > 0] = COLOURS[colour]
            add(10 + i, m, cat, crowd)
        Image.fromarray(img).save(root / f"im{i}.png")
        images.append({"id": 10 + i, "file_name": f"im{i}.png", "height": h, "width": w})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 5, "name": "nucleus"}, {"id": 2, "name": "cell"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "ann.json"


def test_instances_labels_and_crowd_ignore(tmp_path):
    ds = CocoInstanceDataset(build_coco(tmp_path))
    assert len(ds) == 3 and ds.cat_ids == [5, 2] and ds.class_names == ["nucleus", "cell"]
    s = ds[0]
    assert s["image"].shape == (3, 32, 40) and s["image"].dtype == torch.float32
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["masks"].shape == (2, 32, 40) and s["masks"].dtype == torch.bool
    assert s["labels"].tolist() == [0, 1] and s["labels"].dtype == torch.int64
    assert s["image_id"] == 10 and s["orig_size"] == (32, 40)
    assert s["ignore"].sum() == 6 * 40 and s["ignore"][26:].all()  # the crowd, not an instance
    assert not (s["masks"].any(0) & s["ignore"]).any()
    empty = ds[1]
    assert empty["masks"].shape == (0, 24, 30) and empty["labels"].shape == (0,)
    assert "image_strong" not in s


def test_weak_view_keeps_masks_on_object_colour(tmp_path):
    ds = CocoInstanceDataset(build_coco(tmp_path), transform=WeakView(crop_size=(24, 24), hflip=0.5, vflip=0.5),
                             strong_view=True)
    colour = {(0, 0): 0, (0, 1): 1, (2, 0): 2}  # (dataset index, instance) → colour slot
    torch.manual_seed(0)
    for _ in range(6):
        for idx in (0, 2):
            s = ds[idx]
            assert s["image"].shape == s["image_strong"].shape == (3, 24, 24)
            assert s["masks"].shape[1:] == s["valid"].shape == s["ignore"].shape == (24, 24)
            full = ds.load(idx)
            for m, lab in zip(s["masks"], s["labels"]):
                # find which original instance this is by label (labels are unique per image here)
                k = int((full["labels"] == lab).nonzero()[0])
                inner = -torch.nn.functional.max_pool2d(-m[None, None].float(), 3, 1, 1)[0, 0] > 0.5
                if inner.any():
                    want = torch.tensor(COLOURS[colour[(idx, k)]], dtype=torch.float32)[:, None] / 255
                    assert (s["image"][:, inner] - want).abs().max() < 0.02


def test_identity_strong_view_equals_weak_view(tmp_path):
    ds = CocoInstanceDataset(build_coco(tmp_path), transform=WeakView(crop_size=(20, 20)),
                             strong_view=StrongView.identity())
    s = ds[0]
    assert torch.equal(s["image_strong"], s["image"]) and s["image_strong"] is not s["image"]


def test_strong_view_is_recoloured_weak_view(tmp_path):
    ds = CocoInstanceDataset(build_coco(tmp_path), transform=WeakView(crop_size=(32, 32), scale_range=(1, 1)),
                             strong_view=StrongView(blur_p=0, grayscale_p=0, hue=0, jitter_p=1))
    torch.manual_seed(1)
    s = ds[0]
    # Without blur/hue every pixel of one colour maps to one colour: the grids must coincide.
    flat_w = s["image"].flatten(1).T
    flat_s = s["image_strong"].flatten(1).T
    for colour in torch.unique(flat_w, dim=0):
        same = (flat_w == colour).all(1)
        assert torch.unique(flat_s[same], dim=0).shape[0] == 1


def test_collate_pads_and_handles_zero_instances(tmp_path):
    ds = CocoInstanceDataset(build_coco(tmp_path), strong_view=True)
    batch = collate_instances([ds[0], ds[1]])
    assert batch["images"].shape == batch["images_strong"].shape == (2, 3, 32, 40)
    assert batch["valid"].shape == (2, 32, 40)
    assert batch["valid"][0].all() and batch["valid"][1, :24, :30].all() and not batch["valid"][1, 24:].any()
    t0, t1 = batch["targets"]
    assert t0["masks"].shape == (2, 32, 40) and t1["masks"].shape == (0, 32, 40)
    assert t1["labels"].shape == (0,) and t1["ignore"].shape == (32, 40) and t1["orig_size"] == (24, 30)
    assert (batch["images"][1, :, 24:] == 0).all()
    padded = collate_instances([ds[0], ds[1]], size_divisibility=16)
    assert padded["images"].shape == (2, 3, 32, 48) and padded["targets"][0]["masks"].shape == (2, 32, 48)


def test_dataloader_with_two_workers(tmp_path):
    ds = CocoInstanceDataset(build_coco(tmp_path), transform=WeakView(crop_size=(16, 16)), strong_view=True)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_instances)
    ids = [t["image_id"] for b in loader for t in b["targets"]]
    assert ids == [10, 11, 12]


def test_reproducible_under_manual_seed(tmp_path):
    ds = CocoInstanceDataset(build_coco(tmp_path), transform=WeakView(crop_size=(20, 20)), strong_view=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([ds[i] for i in range(3)])
    for a, b in zip(*runs):
        for key in ("image", "image_strong", "masks", "labels", "valid"):
            assert torch.equal(a[key], b[key]), key


def test_grayscale_and_16bit_images(tmp_path):
    gray = np.tile(np.arange(20, dtype=np.uint8) * 10, (12, 1))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    deep = (np.arange(240, dtype=np.uint16).reshape(12, 20) * 200 + 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    m = np.zeros((12, 20), np.uint8)
    m[2:6, 2:9] = 1
    coco = {"images": [{"id": 1, "file_name": "g.png", "height": 12, "width": 20},
                       {"id": 2, "file_name": "d.png", "height": 12, "width": 20}],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "segmentation": M.encode(m), "iscrowd": 0}],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    ds = CocoInstanceDataset(tmp_path / "a.json")
    g, d = ds[0], ds[1]
    assert g["image"].shape == d["image"].shape == (3, 12, 20)
    assert torch.equal(g["image"][0], g["image"][2]) and g["image"].max() > 0.7
    assert d["image"].min() == 0 and d["image"].max() == 1  # 16-bit stretched per image
    assert d["masks"].shape == (1, 12, 20)


def test_image_size_mismatch_is_an_input_error(tmp_path):
    ann = build_coco(tmp_path)
    data = json.loads(ann.read_text())
    data["images"][1]["height"] = 25
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 11]
    ann.write_text(json.dumps(data))
    with pytest.raises(InputError, match="would not line up"):
        CocoInstanceDataset(ann)[1]


def test_unlabeled_folder_skips_non_images_with_one_warning(tmp_path):
    folder = tmp_path / "u"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("hi")
    (folder / "sub" / "meta.csv").write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = UnlabeledImageDataset(folder)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "skipped 2 non-image" in msgs[0] and "notes.txt" in msgs[0]
    assert [ds[i]["file_name"] for i in range(len(ds))] == ["a.jpg", "b.png", "sub/c.png"]
    s = ds[2]
    assert s["image_id"] == 2 and s["image"].shape == s["image_strong"].shape == (3, 6, 8)
    assert s["orig_size"] == (6, 8) and s["valid"].all()


def test_unlabeled_empty_or_missing_source_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        UnlabeledImageDataset(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match="no image files"):
            UnlabeledImageDataset(tmp_path / "txt")
    with pytest.raises(InputError, match="not found"):
        UnlabeledImageDataset(tmp_path / "nope")


def test_split_outputs_load_without_extra_flags(tmp_path):
    """labeled.json / unlabeled.json live in another folder; their images_root key finds the images."""
    ann = build_coco(tmp_path / "data")
    split(ann, labeled_fraction=0.5, out_dir=tmp_path / "s")
    lab = CocoInstanceDataset(tmp_path / "s" / "labeled.json")
    unl = UnlabeledImageDataset(tmp_path / "s" / "unlabeled.json", transform=WeakView(crop_size=(16, 16)))
    assert len(lab) + len(unl) == 3 and len(lab) == 2
    assert lab[0]["image"].shape[0] == 3
    s = unl[0]
    assert s["image"].shape == s["image_strong"].shape == (3, 16, 16) and s["file_name"].startswith("im")
    batch = collate_instances([unl[i] for i in range(len(unl))])
    assert batch["images"].shape == (1, 3, 16, 16) and "masks" not in batch["targets"][0]
    loader = DataLoader(unl, batch_size=1, num_workers=2, collate_fn=functools.partial(collate_instances,
                                                                                      size_divisibility=32))
    assert [b["images"].shape for b in loader] == [(1, 3, 32, 32)]
