"""Student network: output contract, geometry, gradients, variants, presets, pretrained loading."""

from __future__ import annotations


import pytest
import torch

from castseg.errors import CastsegError, InputError
from castseg.models import PRESETS, StudentConfig, build_student, count_parameters, masks_to_image, param_groups
from castseg.models.neck import resample

RESNET = dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
VARIANTS = {
    "dinov2+dpt": {},
    "dinov2+fpn": dict(neck="fpn"),
    "resnet+fpn": dict(encoder_type="backbone", encoder_config=RESNET, out_indices=(1, 2, 3, 4), neck="fpn"),
    "resnet+dpt": dict(encoder_type="backbone", encoder_config=RESNET, out_indices=(1, 2, 3, 4)),
}


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(StudentConfig.from_preset("tiny", num_classes=3, **kw))


def tiny_dinov2_folder(path):
    """A tiny random DINOv2 saved like a hub download (what `huggingface-cli download` gives)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    vit = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=64, image_size=56, patch_size=14))
    vit.save_pretrained(path)
    return vit


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_contract(variant):
    model = tiny(**VARIANTS[variant])
    cfg = model.config
    x = torch.rand(2, 3, 100, 130)  # not a multiple of 14 nor of 32
    out = model(x, return_embeddings=True)
    Q, C = cfg.num_queries, cfg.num_classes
    assert out["image_size"] == (100, 130) and out["padded_size"] == (128, 160) and out["mask_stride"] == 4
    assert out["pred_logits"].shape == (2, Q, C + 1)
    assert out["pred_masks"].shape == (2, Q, 32, 40)
    assert len(out["aux_outputs"]) == cfg.dec_layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, Q, C + 1) and aux["pred_masks"].shape == (2, Q, 32, 40)
    e, s = out["embeddings"], out["embed_stride"]
    assert e.shape == (2, cfg.embed_dim, 128 // s, 160 // s)
    assert torch.allclose(e.norm(dim=1), torch.ones(()), atol=1e-5)
    assert all(torch.isfinite(v).all() for v in (out["pred_logits"], out["pred_masks"], e))
    assert masks_to_image(out["pred_masks"], out["image_size"]).shape == (2, Q, 100, 130)
    assert "embeddings" not in model(x[:1, :, :64, :64])  # optional: off by default


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_reaches_every_trainable_parameter(checkpointing):
    model = tiny(gradient_checkpointing=checkpointing)
    model.train()
    out = model(torch.rand(2, 3, 64, 80), return_embeddings=True)
    preds = [out] + out["aux_outputs"]
    loss = sum(p["pred_logits"].logsumexp(-1).mean() + p["pred_masks"].sigmoid().mean() for p in preds)
    loss = loss + (out["embeddings"][..., :-1] * out["embeddings"][..., 1:]).sum(1).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_resample_is_grid_aligned():
    # A map holding each cell's centre x-coordinate must, after resampling, hold the new cells'
    # centres: stride 14 -> 4 and 14 -> 32 (away from the clamped border), for 10 tokens = 140 px.
    centres = (torch.arange(10.0) * 14 + 7).view(1, 1, 1, 10).expand(1, 1, 3, 10)
    up = resample(centres, 14, 4, (3, 32))[0, 0, 0]
    assert torch.allclose(up[4:30], torch.arange(4, 30) * 4 + 2.0, atol=1e-4)
    down = resample(centres, 14, 32, (3, 4))[0, 0, 0]
    assert torch.allclose(down[:4], torch.arange(4) * 32 + 16.0, atol=1e-4)


def test_mask_to_image_crops_padding_aligned():
    m = (torch.arange(40.0) * 4 + 2).view(1, 1, 1, 40).expand(1, 1, 2, 40)  # stride-4 centres
    full = masks_to_image(m, (5, 130))[0, 0, 0]
    assert full.shape == (130,)
    assert torch.allclose(full[2:128], torch.arange(2, 128) + 0.5, atol=1e-4)  # pixel centres


def test_empty_previous_mask_attends_everywhere():
    model = tiny(dec_layers=2)
    dec = model.decoder
    with torch.no_grad():  # every mask logit = -mask_dim: every query's mask is empty
        last = dec.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.fill_(-1.0)
    feats = [torch.randn(1, 64, 2, 2), torch.randn(1, 64, 4, 4), torch.randn(1, 64, 8, 8)]
    _, _, blocked = dec._predict(dec.query_feat.weight[None], torch.ones(1, 64, 16, 16), (2, 2))
    assert not blocked.any()
    preds = dec(feats, torch.ones(1, 64, 16, 16))
    assert all(torch.isfinite(p["pred_logits"]).all() for p in preds)


def test_freeze_encoder_and_param_groups():
    model = tiny(freeze_encoder=True)
    model.train()
    assert not model.encoder.training and model.decoder.training
    groups = param_groups(model, lr=1e-4, backbone_lr_mult=0.1)
    assert all(not g["name"].startswith("encoder") for g in groups)
    model = tiny()
    groups = param_groups(model, lr=1e-4, backbone_lr_mult=0.1, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == pytest.approx(1e-5) and by_name["head"]["lr"] == pytest.approx(1e-4)
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] == 0.05
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert id(model.decoder.query_feat.weight) in {id(p) for p in by_name["head_no_decay"]["params"]}
    torch.optim.AdamW(groups)  # groups are valid optimizer input


def test_config_dict_round_trip_and_errors():
    cfg = StudentConfig.from_preset("small", num_queries=400, pretrained=False)
    assert cfg.num_queries == 400 and cfg.out_indices == (2, 5, 8, 11) and cfg.encoder_name == "facebook/dinov2-small"
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="cfg.yaml: unknown key model.num_querys; valid keys of model: .*num_queries"):
        StudentConfig.from_dict({"preset": "tiny", "num_querys": 3}, source="cfg.yaml")
    with pytest.raises(InputError, match="unknown preset"):
        StudentConfig.from_preset("huge")


def test_preset_parameter_counts(capsys):
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):  # no memory, no init, no download
            model = build_student(StudentConfig.from_preset(name, pretrained=False))
        counts[name] = count_parameters(model)
    with capsys.disabled():
        print("\nparameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    assert 1e6 < counts["tiny"] < 4e6
    assert 40e6 < counts["small"] < 60e6  # the paper: 52M
    assert counts["small"] < counts["base"] < counts["large"]


def test_pretrained_encoder_from_local_folder(tmp_path):
    vit = tiny_dinov2_folder(tmp_path / "dinov2")
    model = tiny(encoder_name=str(tmp_path / "dinov2"), pretrained=True, out_indices=(0, 1, 2, 3))
    loaded = model.encoder.vit.state_dict()
    for k, v in vit.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert model.config.encoder_config["hidden_size"] == 32  # architecture recorded for checkpoints
    out = model(torch.rand(1, 3, 50, 70))
    assert out["pred_masks"].shape[-2:] == (16, 24)


def test_pretrained_resnet_backbone_from_local_folder(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    cfg = {k: v for k, v in RESNET.items() if k != "model_type"}
    torch.manual_seed(2)
    ResNetModel(ResNetConfig(**cfg)).save_pretrained(tmp_path / "resnet")
    src = ResNetModel.from_pretrained(tmp_path / "resnet").state_dict()
    model = tiny(**{**VARIANTS["resnet+fpn"], "encoder_name": str(tmp_path / "resnet"), "pretrained": True})
    loaded = model.encoder.backbone.state_dict()
    assert set(src) <= set(loaded) and all(torch.equal(loaded[k], v) for k, v in src.items())
    assert model(torch.rand(1, 3, 64, 64))["pred_masks"].shape == (1, 100, 16, 16)


def test_missing_pretrained_encoder_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CastsegError, match=r"castseg-test/no-such-dinov2.*huggingface-cli download "
                                           r"castseg-test/no-such-dinov2 --local-dir"):
        tiny(encoder_name="castseg-test/no-such-dinov2", pretrained=True)
    with pytest.raises(CastsegError, match="does not exist"):
        tiny(encoder_name=str(tmp_path / "missing" / "dinov2-small"), pretrained=True)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_onnx_export_dynamic_shapes(tmp_path, onnx_matches_torch):
    # traced at a size needing no padding; must still pad other sizes
    onnx_matches_torch(tiny(dec_layers=2).eval(), tmp_path / "tiny.onnx", (1, 3, 128, 224),
                       [(1, 3, 100, 130), (2, 3, 96, 160)])
