"""Teacher contract, NMS / mask IoU, ModelTeacher, EnsembleTeacher and the build_teacher factory."""

from __future__ import annotations

import pytest
import torch

from castseg.errors import CastsegError
from castseg.models.teacher import (EnsembleTeacher, ModelTeacher, Teacher, box_iou, mask_iou, masks_to_boxes, nms,
                                    nms_from_iou)
from castseg.models.teacher_factory import build_teacher

H, W = 32, 40


def rect(y0, y1, x0, x1, h=H, w=W):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


class FixedTeacher(Teacher):
    """Returns the same instances for every image; its 'loss' is a parameter's square."""

    def __init__(self, masks, scores, labels, class_names=("a", "b")):
        super().__init__(class_names)
        self.inst = {"masks": torch.stack(masks), "scores": torch.tensor(scores),
                     "labels": torch.tensor(labels, dtype=torch.int64)}
        self.w = torch.nn.Parameter(torch.tensor(2.0))

    def _predict(self, images, class_names):
        return [{k: v.clone() for k, v in self.inst.items()} for _ in range(images.shape[0])]

    def loss(self, images, targets, class_names=None):
        return {"loss": self.w ** 2}


def assert_same(a, b):
    for k in ("masks", "scores", "labels"):
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- geometry

def test_box_iou_and_nms_on_hand_made_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    iou = box_iou(boxes, boxes)
    assert torch.allclose(iou[0, 1], torch.tensor(81 / 119))
    assert iou[0, 2] == 0 and torch.allclose(iou[0, 3], torch.tensor(0.5))
    assert nms(boxes, scores, 0.7).tolist() == [3, 0, 1, 2]            # nothing above 0.7
    assert nms(boxes, scores, 0.6).tolist() == [3, 0, 2]               # 1 overlaps 0 by 0.68
    # greedy: 3 suppresses 0 (IoU 0.5); 0, gone, no longer suppresses 1 (IoU(1, 3) = 36/114)
    assert nms(boxes, scores, 0.4).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.3).tolist() == [3, 2]
    labels = torch.tensor([0, 0, 0, 1])
    assert nms(boxes, scores, 0.4, labels).tolist() == [3, 0, 2]       # class-aware: 3 can't suppress 0
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_masks_to_boxes_pixel_edges():
    m = torch.stack([rect(2, 5, 3, 9), rect(0, 1, 0, 1), torch.zeros(H, W, dtype=torch.bool)])
    assert masks_to_boxes(m).tolist() == [[3, 2, 9, 5], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert masks_to_boxes(torch.zeros(0, H, W, dtype=torch.bool)).shape == (0, 4)


def test_mask_iou_chunked_matches_direct():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 9, 11, generator=g) > 0.5
    b = torch.rand(5, 9, 11, generator=g) > 0.3
    inter = (a[:, None] & b[None]).flatten(2).sum(-1).float()
    union = (a[:, None] | b[None]).flatten(2).sum(-1).float()
    assert torch.allclose(mask_iou(a, b, max_elements=2 * 99), inter / union)  # 2 masks per block
    assert torch.allclose(mask_iou(a, b), inter / union)
    assert mask_iou(a, b[:0]).shape == (7, 0)
    iou = mask_iou(a, a)
    assert nms_from_iou(iou, torch.arange(7.0), 0.99).tolist() == list(range(6, -1, -1))


# ---------------------------------------------------------------- ensemble

def test_ensemble_of_identical_teachers_equals_one():
    args = ([rect(0, 10, 0, 10), rect(12, 30, 12, 38), rect(0, 10, 20, 30)], [0.9, 0.6, 0.4], [0, 1, 0])
    one = FixedTeacher(*args)
    ens = EnsembleTeacher([FixedTeacher(*args), FixedTeacher(*args)])
    x = torch.rand(2, 3, H, W)
    for a, b in zip(one.predict(x), ens.predict(x)):
        assert_same(a, b)


def test_ensemble_keeps_disjoint_and_ranks_by_weighted_score():
    t1 = FixedTeacher([rect(0, 10, 0, 10)], [0.5], [0])
    t2 = FixedTeacher([rect(20, 30, 20, 30)], [0.4], [1])
    out = EnsembleTeacher([t1, t2]).predict(torch.rand(1, 3, H, W))[0]
    assert out["labels"].tolist() == [0, 1] and out["scores"].tolist() == pytest.approx([0.5, 0.4])
    out = EnsembleTeacher([t1, t2], weights=[1.0, 2.0]).predict(torch.rand(1, 3, H, W))[0]
    assert out["labels"].tolist() == [1, 0] and out["scores"].tolist() == pytest.approx([0.8, 0.5])
    assert out["masks"].shape == (2, H, W)


def test_ensemble_overlaps_class_aware_or_agnostic():
    t1 = FixedTeacher([rect(0, 10, 0, 10)], [0.9], [0])
    t2 = FixedTeacher([rect(0, 10, 1, 10)], [0.8], [1])        # IoU 0.9 with t1's mask, other class
    t3 = FixedTeacher([rect(0, 10, 1, 10)], [0.95], [0])       # same class as t1, higher score
    x = torch.rand(1, 3, H, W)
    assert EnsembleTeacher([t1, t2]).predict(x)[0]["labels"].tolist() == [0, 1]
    assert EnsembleTeacher([t1, t2], class_agnostic=True).predict(x)[0]["labels"].tolist() == [0]
    out = EnsembleTeacher([t1, t3]).predict(x)[0]
    assert out["scores"].tolist() == pytest.approx([0.95]) and torch.equal(out["masks"][0], rect(0, 10, 1, 10))
    assert len(EnsembleTeacher([t1, t2], max_detections=1).predict(x)[0]["scores"]) == 1


def test_ensemble_loss_and_parameters():
    t1, t2 = FixedTeacher([rect(0, 1, 0, 1)], [0.5], [0]), FixedTeacher([rect(0, 1, 0, 1)], [0.5], [0])
    ens = EnsembleTeacher([t1, t2], weights=[1.0, 0.5])
    losses = ens.loss(torch.rand(1, 3, H, W), [])
    assert losses["loss"].item() == pytest.approx(4 + 2) and "member1_loss" in losses
    assert len(list(ens.trainable_parameters())) == 2
    assert ens.resolve_class_names(None) == ["a", "b"]
    with pytest.raises(CastsegError, match="2 members"):
        EnsembleTeacher([t1, t2], weights=[1.0])


# ---------------------------------------------------------------- a student-architecture model as teacher

def tiny_student(num_classes=2):
    from castseg.models import StudentConfig, build_student

    torch.manual_seed(0)
    return build_student(StudentConfig.from_preset("tiny", num_classes=num_classes, dec_layers=2, num_queries=10))


def test_model_teacher_predict_and_loss():
    teacher = ModelTeacher(tiny_student(), ["cell", "debris"], postprocess_kwargs={"topk": 6})
    x = torch.rand(2, 3, 50, 70)
    out = teacher.predict(x)
    for r in out:
        assert r["masks"].shape == (6, 50, 70) and r["masks"].dtype == torch.bool
        assert r["labels"].dtype == torch.int64 and r["labels"].max() < 2
        assert torch.all(r["scores"][:-1] >= r["scores"][1:])
    targets = [{"labels": torch.tensor([1]), "masks": rect(5, 20, 5, 30, 50, 70)[None]}] * 2
    teacher.train()
    # its loss trains it: a few AdamW steps on this batch bring the loss well down (28 -> ~15)
    opt = torch.optim.AdamW(list(teacher.trainable_parameters()), lr=1e-3)
    seen = []
    for _ in range(6):
        loss = teacher.loss(x, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    assert seen[-1] < 0.8 * seen[0], seen
    with pytest.raises(CastsegError, match="predicts 2 classes"):
        teacher.predict(x, ["only-one"])


def test_model_teacher_with_injected_loss_and_fake_model():
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            b = images.shape[0]
            logits = torch.zeros(b, 3, 2) + self.b
            logits[:, 0, 0] = 5.0  # query 0 is class 0, the rest no-object
            masks = torch.full((b, 3, images.shape[-2] // 4, images.shape[-1] // 4), -5.0)
            masks[:, 0, :2, :3] = 5.0
            return {"pred_logits": logits, "pred_masks": masks, "aux_outputs": []}

    calls = []

    def loss_fn(outputs, targets):
        calls.append(len(targets))
        return {"loss": outputs["pred_logits"].sum()}

    teacher = ModelTeacher(Fake(), ["x"], postprocess_kwargs={"topk": 1}, loss_fn=loss_fn)
    r = teacher.predict(torch.rand(1, 3, 16, 24))[0]
    m = r["masks"][0]  # the 2x3 low-res block at stride 4 (bilinear rounds off its far corner)
    assert r["labels"].tolist() == [0] and m[:7, :11].all() and not m[8:].any() and not m[:, 12:].any()
    assert "loss" in teacher.loss(torch.rand(1, 3, 16, 24), [{}]) and calls == [1]


# ---------------------------------------------------------------- factory

def test_build_teacher_checkpoint_and_ensemble(tmp_path):
    from castseg.models import save_checkpoint

    model = tiny_student()
    save_checkpoint(tmp_path / "ckpt", model, None, ["cell", "debris"], step=3)
    teacher = build_teacher({"type": "checkpoint", "path": str(tmp_path / "ckpt"), "postprocess_kwargs": {"topk": 4}})
    assert isinstance(teacher, ModelTeacher) and teacher.class_names == ["cell", "debris"]
    x = torch.rand(1, 3, 40, 40)
    assert_same(teacher.predict(x)[0], ModelTeacher(model.eval(), ["cell", "debris"], {"topk": 4}).predict(x)[0])
    ens = build_teacher({"type": "ensemble", "mask_nms_iou": 0.5,
                         "members": [{"type": "checkpoint", "path": str(tmp_path / "ckpt")}] * 2})
    assert isinstance(ens, EnsembleTeacher) and len(ens.teachers) == 2
    out = ens.predict(x)[0]  # class names come from the members' checkpoints
    assert len(out["scores"]) <= 100 and out["masks"].shape[1:] == (40, 40)


def test_build_teacher_errors_name_the_key():
    with pytest.raises(CastsegError, match="teacher.type: must be one of 'checkpoint', 'onnx', 'grounded_sam', "
                                           "'ensemble', 'tta', got 'sam3'"):
        build_teacher({"type": "sam3"})
    with pytest.raises(CastsegError, match="'type'"):
        build_teacher({"path": "x"})
    with pytest.raises(CastsegError, match="teacher.path: required"):
        build_teacher({"type": "checkpoint"})
    with pytest.raises(CastsegError, match="teacher.members"):
        build_teacher({"type": "ensemble", "members": []})
    with pytest.raises(CastsegError, match="unknown key teacher.mask_iou; valid keys of teacher: .*mask_nms_iou"):
        build_teacher({"type": "ensemble", "members": [{"type": "checkpoint", "path": "x"}], "mask_iou": 0.5})


def test_an_adapted_ensemble_saves_and_loads_as_one_teacher(tmp_path):
    """EnsembleTeacher.save_pretrained writes its members and a teacher.yaml that load_teacher reads back."""
    from castseg.models import save_checkpoint
    from castseg.pseudo_labels import load_teacher

    save_checkpoint(tmp_path / "a", tiny_student(), None, ["cell", "debris"], step=0)
    ens = build_teacher({"type": "ensemble", "weights": [1.0, 0.5], "members": [
        {"type": "checkpoint", "path": str(tmp_path / "a")}] * 2})
    ens.save_pretrained(tmp_path / "saved")
    back, info = load_teacher(tmp_path / "saved")
    assert isinstance(back, EnsembleTeacher) and back.weights == [1.0, 0.5] and len(info["weights"]) == 2
    x = torch.rand(1, 3, 40, 40)
    assert_same(back.predict(x)[0], ens.eval().predict(x)[0])



def test_a_checkpoint_teacher_and_predict_default_to_the_gpu_when_there_is_one(tmp_path, monkeypatch):
    """`teacher: {type: checkpoint}` loaded to the CPU unless told otherwise, and `castseg predict`
    / `pseudo-label` defaulted to --device cpu: on a GPU machine every teacher pass crawled.
    Now "auto" (here faked as the meta device): this process's GPU when there is one."""
    from castseg.commands import predict, pseudo_label
    from castseg.models import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", tiny_student(), None, ["cell", "debris"], step=3)
    monkeypatch.setattr("castseg.device.resolve_device", lambda spec="auto", local_rank=None: torch.device(
        "meta" if spec == "auto" else spec))
    teacher = build_teacher({"type": "checkpoint", "path": str(tmp_path / "ckpt")})
    assert {p.device.type for p in teacher.parameters()} == {"meta"}
    import argparse

    for command in (predict, pseudo_label):
        sub = argparse.ArgumentParser().add_subparsers()
        args = command.add_parser(sub).parse_args(["--out", "x", "--images", "y", "--teacher", "z"]
                                                  if command is pseudo_label else ["--out", "x", "--images", "y",
                                                                                   "--checkpoint", "z"])
        assert args.device == "auto", command.__name__
