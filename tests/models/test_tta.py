"""Test-time-augmented teacher: views flipped back, duplicates fused, one-view detections
down-weighted, and a fingerprint that keeps caches of other views apart."""

from __future__ import annotations

import pytest
import torch

from castseg.errors import CastsegError
from castseg.models.teacher import Teacher
from castseg.models.teacher_factory import build_teacher
from castseg.models.tta import TTATeacher, with_tta


class BrightObjects(Teacher):
    """Finds the pixels > 0.5 as one object (score 0.9), plus a spurious detection at a fixed
    input-frame position (score 0.95): equivariant to flips, and not, respectively."""

    def __init__(self):
        super().__init__(["nucleus"])
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to live on

    def _predict(self, images, class_names):
        out = []
        for img in images:
            real = img[0] > 0.5
            spurious = torch.zeros_like(real)
            spurious[0:2, 0:3] = True
            out.append({"masks": torch.stack([spurious, real]), "scores": torch.tensor([0.95, 0.9]),
                        "labels": torch.tensor([0, 0])})
        return out


def _image():
    img = torch.zeros(1, 3, 12, 16)
    img[..., 5:10, 8:11] = 1.0  # an L-shaped object: flips would show if it came back mirrored
    img[..., 9, 11:14] = 1.0
    return img


def test_flipped_views_are_flipped_back_and_fused():
    img = _image()
    r = TTATeacher(BrightObjects(), flips=["h", "v"]).predict(img)[0]
    # the real object is seen in all 3 views at the same place: full score, exact mask
    assert torch.allclose(r["scores"][0], torch.tensor(0.9))
    assert torch.equal(r["masks"][0], img[0, 0] > 0.5)
    # the spurious one lands in 3 different places (one per view): each kept at 1/3 of its score
    assert torch.allclose(r["scores"][1:], torch.full((3,), 0.95 / 3))
    assert r["masks"][1:].sum(dim=(1, 2)).tolist() == [6, 6, 6]
    assert r["masks"][1:].flatten(1).float().mm(r["masks"][1:].flatten(1).float().T).triu(1).sum() == 0


def test_majority_vote_of_masks():
    class Shifting(BrightObjects):
        calls = 0

        def _predict(self, images, class_names):
            Shifting.calls += 1
            m = torch.zeros(images.shape[-2:], dtype=torch.bool)
            m[2:8, 2:8] = True
            if Shifting.calls == 2:  # the h-flipped view sees one extra column (after unflipping)
                m = m.flip(-1)
                m[2:8, -9] = True
            return [{"masks": m[None], "scores": torch.tensor([0.8]), "labels": torch.tensor([0])}]

    r = TTATeacher(Shifting(), flips=["h", "v"]).predict(torch.zeros(1, 3, 10, 10))[0]
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[2:8, 2:8] = True  # 2 of 3 views agree on the square; the extra column has 1 vote
    assert len(r["scores"]) == 1 and torch.equal(r["masks"][0], expected)


def test_build_from_config_and_errors(tmp_path):
    from castseg.models import StudentConfig, build_student, save_checkpoint

    model = build_student(StudentConfig.from_preset("tiny", dec_layers=1, num_queries=5))
    save_checkpoint(tmp_path / "m", model, None, ["nucleus"], step=0)
    t = build_teacher({"type": "tta", "member": {"type": "checkpoint", "path": str(tmp_path / "m")}, "flips": ["hv"]})
    assert isinstance(t, TTATeacher) and t.flips == ["hv"] and t.class_names == ["nucleus"]
    with pytest.raises(CastsegError, match="teacher.flips.0: must be one of 'h', 'v' or 'hv', got 'diagonal'"):
        build_teacher({"type": "tta", "member": {"type": "checkpoint", "path": "m"}, "flips": ["diagonal"]})
    with pytest.raises(CastsegError, match="teacher.member: required"):
        build_teacher({"type": "tta"})


def test_fingerprint_depends_on_the_views():
    info = {"sha256": "a" * 64, "config": {"type": "checkpoint"}}
    _, h = with_tta(BrightObjects(), info, ["h"])
    _, hv = with_tta(BrightObjects(), info, ["h", "v"])
    assert len({info["sha256"], h["sha256"], hv["sha256"]}) == 3
    assert hv["config"] == {"type": "tta", "flips": ["h", "v"], "member": {"type": "checkpoint"}}


def test_an_adapted_tta_teacher_saves_and_loads_as_one_teacher(tmp_path):
    """`castseg run` with teacher: {type: tta} saves the adapted teacher: the member in member/ and a
    teacher.yaml that load_teacher (pseudo-labels, predict) reads back to the same predictions."""
    from castseg.models import StudentConfig, build_student, save_checkpoint
    from castseg.pseudo_labels import load_teacher

    model = build_student(StudentConfig.from_preset("tiny", dec_layers=1, num_queries=5))
    save_checkpoint(tmp_path / "m", model, None, ["nucleus"], step=0)
    t = build_teacher({"type": "tta", "member": {"type": "checkpoint", "path": str(tmp_path / "m")}, "flips": ["v"]})
    t.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["member", "teacher.yaml"]
    back, _ = load_teacher(tmp_path / "saved")
    assert isinstance(back, TTATeacher) and back.flips == ["v"]
    x = torch.rand(1, 3, 32, 32)
    a, b = t.eval().predict(x)[0], back.predict(x)[0]
    assert torch.equal(a["masks"], b["masks"]) and torch.allclose(a["scores"], b["scores"])
    # a composite member cannot be saved inside another one: one clear error, not a wrong spec
    with pytest.raises(CastsegError, match="nested"):
        TTATeacher(t, flips=["h"]).save_pretrained(tmp_path / "nested")
