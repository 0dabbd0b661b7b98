"""Batched model → COCO results → AP: an oracle scores AP 1, the tiny student runs end to end,
and the trainer validates and checkpoints a real student with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from castseg.config import TrainConfig
from castseg.data import masks as M
from castseg.data.dataset import CocoInstanceDataset, collate_instances
from castseg.data.transforms import WeakView
from castseg.engine import Trainer
from castseg.engine.data import BatchStream
from castseg.evaluate import evaluate_model, make_evaluator, predict_dataset
from castseg.losses import HungarianMatcher, SetLoss
from castseg.models import StudentConfig, build_student, load_checkpoint

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# (h, w), objects as (y0, y1, x0, x1, colour, category id); categories listed as [5, 2].
IMAGES = [((40, 48), [(2, 14, 3, 17, RED, 5), (18, 30, 20, 40, GREEN, 2)]),
          ((30, 36), [(5, 20, 5, 20, BLUE, 5)]),
          ((44, 40), [(10, 30, 8, 30, GREEN, 2), (32, 42, 2, 12, RED, 5)])]
CLASS_OF = {RED: 0, BLUE: 0, GREEN: 1}  # category 5 → class 0, 2 → class 1


def build_coco(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, ((h, w), objs) in enumerate(IMAGES):
        img = np.full((h, w, 3), 128, np.uint8)
        for y0, y1, x0, x1, colour, cat in objs:
            m = np.zeros((h, w), np.uint8)
            m[y0:y1, x0:x1] = 1
            img[m > 0] = colour
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat, "segmentation": M.encode(m),
                         "area": int(m.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
        Image.fromarray(img).save(root / f"im{i}.png")
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "height": h, "width": w})
    path = root / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 5, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path


class ColourOracle(nn.Module):
    """Predicts each coloured object exactly: query k = colour k, mask logits at stride 1."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, images):
        b = images.shape[0]
        colours = [RED, GREEN, BLUE]
        logits = torch.full((b, 4, 3), -10.0)
        masks = torch.full((b, 4, *images.shape[-2:]), -10.0)
        # Each pixel takes the nearest of grey / red / green / blue (robust to resized edges).
        refs = torch.tensor([(128, 128, 128), *colours], dtype=torch.float32) / 255   # [4,3]
        nearest = (images[:, None] - refs[None, :, :, None, None]).pow(2).sum(2).argmin(1)  # [B,H,W]
        for k, c in enumerate(colours):
            hit = nearest == k + 1
            masks[:, k] = torch.where(hit, 10.0, -10.0)
            present = hit.flatten(1).any(1)
            logits[:, k, CLASS_OF[c]] = torch.where(present, 10.0, -10.0)
            logits[:, k, 2] = torch.where(present, -10.0, 10.0)
        logits[:, 3, 2] = 10.0
        return {"pred_logits": logits + self.dummy, "pred_masks": masks, "mask_stride": 1}


def test_oracle_scores_ap_one_with_padding_batches(tmp_path):
    val = build_coco(tmp_path)
    model = ColourOracle().train()
    stats = evaluate_model(model, val, batch_size=2, topk=4)  # images of different sizes share a batch
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert model.training  # mode restored
    records = predict_dataset(model, val, batch_size=3, topk=4, score_threshold=0.5)
    assert sorted((r["image_id"], r["category_id"]) for r in records) == \
        [(100, 2), (100, 5), (101, 5), (102, 2), (102, 5)]
    # Downscaled inputs: masks come back at the original size (AP stays high, not exact).
    small = evaluate_model(model, val, batch_size=2, topk=4, max_size=24, results_path=tmp_path / "res.json")
    assert small["AP50"] == pytest.approx(1.0) and small["AP"] > 0.5
    assert len(json.loads((tmp_path / "res.json").read_text())) == small["num_predictions"]


def test_trainer_validates_and_checkpoints_a_tiny_student(tmp_path):
    val = build_coco(tmp_path / "data")
    torch.manual_seed(0)
    model = build_student(StudentConfig.from_preset("tiny", num_classes=2, num_queries=8, dec_layers=1))
    ds = CocoInstanceDataset(val, transform=WeakView(crop_size=(32, 32), scale_range=(0.8, 1.2)))
    crit = SetLoss(2, HungarianMatcher(num_points=256), num_points=256)

    def loss_fn(m, batches, step):
        b = batches["labeled"]
        return crit(m(b["images"]), [{"labels": t["labels"], "masks": t["masks"]} for t in b["targets"]])

    cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-4, ckpt_every=1, log_every=1, device="cpu", save_best=True)
    trainer = Trainer(model, loss_fn, {"labeled": BatchStream(ds, 2, collate_fn=collate_instances)}, cfg,
                      tmp_path / "run", evaluate_fn=make_evaluator(val, batch_size=3, topk=10), name="refine",
                      class_names=["a", "b"], run_config={"note": "test"})
    result = trainer.fit()
    assert result["step"] == 2 and result["val"]["step"] == 2
    assert result["val"]["num_predictions"] == 3 * 10
    assert {"loss", "grad_norm", "lr"} <= set(result["train"])
    # checkpoints/last is a regular castseg checkpoint: eval/export can load it as is.
    loaded, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert meta["class_names"] == ["a", "b"] and meta["step"] == 2 and meta["config"] == {"note": "test"}
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), loaded.state_dict()[k]), k
    # the last validation is the evaluation of those final weights (2 steps from random: AP 0 here,
    # the oracle above shows a scoring model gets 1)
    assert result["val"] == {"step": 2, **evaluate_model(loaded, val, batch_size=3, topk=10)}
    assert result["val"]["AP"] == result["val"]["AP50"] == 0.0
    _, best_meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "best")
    assert best_meta["extra"]["val"]["AP"] == result["best_val"]["AP"]
