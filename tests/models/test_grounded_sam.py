"""Grounding DINO + SAM2 teacher on tiny random models (CPU, offline, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from castseg.errors import CastsegError
from castseg.models.grounded_sam import (GroundedSAMTeacher, build_prompt, chunk_classes, normalize_class_name,
                                         phrase_token_map)
from castseg.models.teacher_factory import build_teacher
from castseg.models.tiny_teacher import TINY_DETECTOR, TINY_SEGMENTER, save_tiny_tokenizer

CLASSES = ["cat", "traffic light", "person"]
WORDS = ["cat", "dog", "traffic", "light", "person", "car", "nucleus", "red", "blue"]

DETECTOR, SEGMENTER = TINY_DETECTOR, TINY_SEGMENTER


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), WORDS))


def make(tokenizer_dir, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(pretrained=False, detector_config=DETECTOR, segmenter_config=SEGMENTER, tokenizer=tokenizer_dir,
                detector_size=(64, 96), box_threshold=0.0, text_threshold=0.0, class_names=CLASSES)
    return GroundedSAMTeacher(**{**opts, **kw})


def images(b=2, h=48, w=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def square_targets(b=1, h=48, w=72):
    out = []
    for i in range(b):
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[0, 4:20, 6:30] = True
        m[1, 25:44, 40 - i:66] = True
        out.append({"labels": torch.tensor([0, 1]), "masks": m})
    return out


def test_prompt_and_names():
    assert build_prompt(["Cat", "traffic_light", " Traffic  Light. "]) == "cat . traffic light . traffic light ."
    assert normalize_class_name("St. Bernard?") == "st bernard"
    with pytest.raises(CastsegError, match="empty"):
        normalize_class_name(" . ")
    assert chunk_classes([1, 2, 1], 100) == [[0, 1, 2]]
    # [CLS] + (name + ".") per class + [SEP] ≤ 7 → 2 + 2 + 3 = 7, then a new prompt
    assert chunk_classes([1, 2, 1], 7) == [[0, 1], [2]]
    with pytest.raises(CastsegError, match="text limit"):
        chunk_classes([9], 8)


def test_multi_word_phrase_maps_to_its_class(tokenizer_dir):
    from transformers import AutoTokenizer
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok([build_prompt(CLASSES)], return_tensors="pt")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]) == ["[CLS]", "cat", ".", "traffic", "light", ".", "person", ".", "[SEP]"]
    m = phrase_token_map(ids[0], torch.tensor([101, 102, 1012, 1029, 0]), 16)
    assert m.shape == (3, 16)
    assert m[1].nonzero().flatten().tolist() == [3, 4]  # "traffic light" = one class, both tokens
    # the same grouping transformers' detection loss uses for class_labels
    assert torch.equal(m.long(), build_label_maps(torch.zeros(1, 1, 16), ids)[0])


def test_detector_scores_by_class_span(tokenizer_dir):
    """A query whose 'light' token is hot gets class 1 ("traffic light") and that probability."""
    teacher = make(tokenizer_dir)
    logits = torch.full((1, 30, 32), -10.0)
    logits[0, 0, 4] = 3.0   # "light"
    logits[0, 1, 6] = 1.0   # "person"
    logits[0, 2, 2] = 5.0   # "." — a delimiter, belongs to no class
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]] + [[0.5, 0.5, 0.1, 0.1]] * 28)[None]

    class Out:
        pass

    def fake_detector(**kw):
        o = Out()
        o.logits, o.pred_boxes = logits, boxes
        return o

    teacher.detector.forward = fake_detector
    teacher.box_threshold = teacher.text_threshold = 0.5
    d = teacher.detect(images(1, 40, 80), CLASSES)[0]
    assert d["labels"].tolist() == [1, 2]
    assert torch.allclose(d["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    assert torch.allclose(d["boxes"][0], torch.tensor([16.0, 8.0, 32.0, 16.0]))  # cxcywh·(W,H) → xyxy


def test_predict_contract(tokenizer_dir):
    teacher = make(tokenizer_dir, max_detections=7)
    teacher.train()
    out = teacher.predict(images(2, 48, 72), CLASSES)
    assert teacher.training  # mode restored
    assert len(out) == 2
    for r in out:
        k = len(r["scores"])
        assert 0 < k <= 7
        assert r["masks"].dtype == torch.bool and r["masks"].shape == (k, 48, 72)
        assert r["scores"].dtype == torch.float32 and r["labels"].dtype == torch.int64
        assert r["labels"].min() >= 0 and r["labels"].max() < len(CLASSES)
        assert torch.all(r["scores"][:-1] >= r["scores"][1:])


def test_high_threshold_gives_empty_and_stored_names_are_default(tokenizer_dir):
    teacher = make(tokenizer_dir, box_threshold=1.0)
    out = teacher.predict(images(1))  # class names from the constructor
    assert out[0]["masks"].shape == (0, 48, 72) and out[0]["labels"].dtype == torch.int64
    teacher.class_names = None
    with pytest.raises(CastsegError, match="class names"):
        teacher.predict(images(1))


def test_many_classes_split_into_several_prompts(tokenizer_dir):
    teacher = make(tokenizer_dir)
    names = WORDS * 1  # 9 one-token classes: 2 + 9·2 = 20 tokens
    teacher.max_text_tokens = 8  # → 3 classes per prompt
    assert [idx for idx, _ in teacher.prompts(names)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    out = teacher.predict(images(1), names)[0]
    assert out["labels"].max() < 9 and len(out["labels"]) > 0


def test_image_embeddings_match_transformers(tokenizer_dir):
    teacher = make(tokenizer_dir).eval()
    x = images(2)
    ours = teacher.image_embeddings(x)
    pixels = teacher._normalize(x, (64, 64), torch.float32)
    ref = teacher.segmenter.get_image_embeddings(pixels)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_loss_gradients_and_frozen_encoder(tokenizer_dir):
    teacher = make(tokenizer_dir)
    teacher.train()
    assert not teacher.segmenter.vision_encoder.training
    losses = teacher.loss(images(2), square_targets(2))
    for k in ("loss", "loss_det", "loss_mask_bce", "loss_mask_dice"):
        assert losses[k].dim() == 0 and torch.isfinite(losses[k]), k
    assert "det_loss_ce" in losses and "det_loss_giou" in losses
    losses["loss"].backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(teacher.detector.model.backbone) and has_grad(teacher.detector.bbox_embed)
    assert has_grad(teacher.segmenter.mask_decoder) and has_grad(teacher.segmenter.prompt_encoder)
    assert all(p.grad is None for p in teacher.segmenter.vision_encoder.parameters())
    trainable = {id(p) for p in teacher.trainable_parameters()}
    assert not any(id(p) in trainable for p in teacher.segmenter.vision_encoder.parameters())
    assert all(id(p) in trainable for p in teacher.segmenter.mask_decoder.parameters())


def test_loss_without_objects_and_detector_frozen(tokenizer_dir):
    teacher = make(tokenizer_dir, train_detector=False)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 48, 72, dtype=torch.bool)}]
    losses = teacher.loss(images(1), empty)
    assert losses["loss"].item() == 0.0 and losses["loss"].requires_grad
    assert not any(p.requires_grad for p in teacher.detector.parameters())
    teacher = make(tokenizer_dir)
    losses = teacher.loss(images(1), empty)  # the detector still learns "nothing here"
    assert torch.isfinite(losses["loss_det"]) and losses["loss_det"].item() > 0


def test_adaptation_steps_reduce_the_loss(tokenizer_dir):
    teacher = make(tokenizer_dir, seed=1)
    teacher.train()
    opt = torch.optim.Adam(teacher.trainable_parameters(), lr=2e-3)
    x, tgt = images(1), square_targets(1)
    history, mask_terms = [], []
    for _ in range(8):
        losses = teacher.loss(x, tgt)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append(losses["loss"].item())
        mask_terms.append(losses["loss_mask_bce"].item() + losses["loss_mask_dice"].item())
    assert history[-1] < 0.8 * history[0], history
    assert mask_terms[-1] < mask_terms[0], mask_terms  # SAM2's decoder learns too, not only the detector


def test_save_and_load_round_trip(tokenizer_dir, tmp_path):
    teacher = make(tokenizer_dir, max_detections=5, nms_iou=0.6)
    x = images(2)
    before = teacher.predict(x)
    teacher.save_pretrained(tmp_path / "teacher")
    files = {p.name for p in (tmp_path / "teacher").rglob("*")}
    assert {"teacher.json", "detector", "segmenter", "model.safetensors", "config.json"} <= files
    meta = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert meta["class_names"] == CLASSES and meta["options"]["nms_iou"] == 0.6
    loaded = GroundedSAMTeacher.from_pretrained(tmp_path / "teacher")
    assert loaded.class_names == CLASSES and loaded.max_detections == 5
    after = loaded.predict(x)
    for a, b in zip(before, after):
        for k in ("masks", "scores", "labels"):
            assert torch.equal(a[k], b[k]), k
    # what a user does with `huggingface-cli download` folders (tokenizer: the detector's folder)
    user = GroundedSAMTeacher(detector=str(tmp_path / "teacher" / "detector"),
                              segmenter=str(tmp_path / "teacher" / "segmenter"), class_names=CLASSES,
                              detector_size=(64, 96), box_threshold=0.0, text_threshold=0.0, max_detections=5,
                              nms_iou=0.6)
    assert torch.equal(user.predict(x)[1]["masks"], before[1]["masks"])
    # the same through the factory, with an override
    t2 = build_teacher({"type": "grounded_sam", "path": str(tmp_path / "teacher"), "max_detections": 2})
    assert t2.max_detections == 2 and len(t2.predict(x)[0]["scores"]) <= 2


def test_missing_weights_give_one_clear_line(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CastsegError, match="castseg-tests/no-such-detector") as e:
        GroundedSAMTeacher(detector="castseg-tests/no-such-detector", tokenizer=tokenizer_dir)
    assert "huggingface-cli download castseg-tests/no-such-detector --local-dir DIR" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(CastsegError, match="does not exist"):
        GroundedSAMTeacher(detector=str(tmp_path / "nope"), tokenizer=tokenizer_dir)
    with pytest.raises(CastsegError, match="not a saved grounded-SAM teacher"):
        GroundedSAMTeacher.from_pretrained(tmp_path)
    with pytest.raises(CastsegError, match="unknown key teacher.box_treshold; valid keys of teacher: .*box_threshold"):
        build_teacher({"type": "grounded_sam", "box_treshold": 0.3})


def test_factory_builds_random_tiny_teacher(tokenizer_dir):
    teacher = build_teacher({"type": "grounded_sam", "pretrained": False, "detector_config": DETECTOR,
                             "segmenter_config": SEGMENTER, "tokenizer": tokenizer_dir, "detector_size": [64, 96]})
    assert isinstance(teacher, GroundedSAMTeacher) and teacher.detector_size == (64, 96)
    assert teacher.box_threshold == 0.3 and teacher.max_detections == 100  # the documented defaults


def test_paper_teacher_parameter_count():
    from castseg.models.sizes import teacher_parameter_counts

    n = teacher_parameter_counts()
    assert 225e6 < n["grounding-dino-base"] < 240e6   # grounding-dino-base: 233M
    assert 210e6 < n["sam2.1-hiera-large"] < 225e6    # image-mode SAM2.1-L (no video memory modules)
    assert abs(n["grounding-dino-large"] + n["sam2.1-hiera-large"] - 568e6) / 568e6 < 0.03  # paper: 568M


def test_a_bf16_hub_folder_loads_with_fp32_master_weights(tokenizer_dir, tmp_path):
    """transformers loads a folder in the dtype it was saved in; a bf16 upload used to train with
    bf16 master weights (updates below bf16's precision vanish). Loaded as fp32; amp decides compute."""
    teacher = make(tokenizer_dir)
    teacher.detector.to(torch.bfloat16).save_pretrained(tmp_path / "det")
    teacher.segmenter.to(torch.bfloat16).save_pretrained(tmp_path / "seg")
    loaded = GroundedSAMTeacher(detector=str(tmp_path / "det"), segmenter=str(tmp_path / "seg"),
                                tokenizer=tokenizer_dir, class_names=CLASSES)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
