"""castseg checkpoints: safetensors + json round trips, offline rebuild, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from castseg import __version__
from castseg.data.split import sha256_file
from castseg.errors import CastsegError, InputError
from castseg.models import StudentConfig, build_student, load_checkpoint, save_checkpoint
from castseg.models.checkpoint import checkpoint_paths

RESNET = dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
SMALL = dict(num_classes=2, dec_layers=2, num_queries=20)


def make(**kw):
    torch.manual_seed(0)
    return build_student(StudentConfig.from_preset("tiny", **{**SMALL, **kw}))


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x, return_embeddings=True)
    return [out["pred_logits"], out["pred_masks"], out["embeddings"]] + [a["pred_masks"] for a in out["aux_outputs"]]


def assert_same_outputs(a, b, x):
    for u, v in zip(outputs(a, x), outputs(b, x)):
        assert torch.equal(u, v)


def saved(tmp_path, **kw):
    model = make(**kw)
    meta_path = save_checkpoint(tmp_path / "ckpt", model, {"train": {"lr": 1e-4}}, ["cell", "debris"], step=7)
    return model, meta_path


def test_round_trip_identical_outputs(tmp_path):
    model, meta_path = saved(tmp_path)
    assert meta_path == tmp_path / "ckpt" / "model.json"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]  # no temps
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    assert_same_outputs(model, loaded, torch.rand(2, 3, 100, 130))
    assert meta["class_names"] == ["cell", "debris"] and meta["step"] == 7 and meta["castseg_version"] == __version__
    assert meta["config"] == {"train": {"lr": 1e-4}}
    assert meta["weights"]["sha256"] == sha256_file(tmp_path / "ckpt" / "model.safetensors")
    assert meta["architecture"]["encoder_config"]["model_type"] == "dinov2"
    assert loaded.config == model.config
    # the json or the weights file name work as well as the folder
    for p in checkpoint_paths(tmp_path / "ckpt"):
        assert load_checkpoint(p)[1]["step"] == 7


def test_file_name_form_and_overwrite(tmp_path):
    model = make()
    meta_path = save_checkpoint(tmp_path / "runs" / "last.safetensors", model, None, ["a", "b"], 1, extra={"ap": 0.1})
    assert meta_path == tmp_path / "runs" / "last.json" and (tmp_path / "runs" / "last.safetensors").is_file()
    save_checkpoint(tmp_path / "runs" / "last.json", model, None, ["a", "b"], 2)  # overwrite in place
    _, meta = load_checkpoint(tmp_path / "runs" / "last.json")
    assert meta["step"] == 2 and meta["extra"] == {}


def test_pretrained_encoder_checkpoint_loads_offline_without_the_encoder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             image_size=56)).save_pretrained(tmp_path / "dinov2")
    model = make(encoder_name=str(tmp_path / "dinov2"), pretrained=True, out_indices=(0, 1, 2, 3))
    save_checkpoint(tmp_path / "ckpt", model, None, ["a", "b"], 3)
    shutil.rmtree(tmp_path / "dinov2")  # the checkpoint alone must be enough
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["architecture"]["pretrained"] is False
    assert_same_outputs(model, loaded, torch.rand(1, 3, 60, 60))


def test_resnet_variant_round_trip(tmp_path):
    model = make(encoder_type="backbone", encoder_config=RESNET, out_indices=(1, 2, 3, 4), neck="fpn")
    bn = model.encoder.backbone.embedder.embedder.normalization
    before = bn.running_mean.clone()
    model.train()
    model(torch.rand(2, 3, 64, 64))  # BN is frozen (default): running stats must not move
    assert torch.equal(bn.running_mean, before) and not bn.training
    save_checkpoint(tmp_path / "ckpt", model, None, ["a", "b"], 0)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert_same_outputs(model, loaded, torch.rand(1, 3, 64, 96))


def test_corrupt_weights_is_a_clear_error(tmp_path):
    _, meta_path = saved(tmp_path)
    weights = meta_path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(InputError, match=r"model\.safetensors.*sha256 does not match"):
        load_checkpoint(tmp_path / "ckpt")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(data[100:200]))
    with pytest.raises(InputError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "ckpt", verify=False)


def test_missing_files_are_clear_errors(tmp_path):
    _, meta_path = saved(tmp_path)
    meta_path.with_suffix(".safetensors").unlink()
    with pytest.raises(InputError, match=r"model\.safetensors: weights file not found"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(InputError, match="not a castseg checkpoint folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(InputError, match="file not found"):
        load_checkpoint(tmp_path / "nothing.json")


@pytest.mark.parametrize("drop", ["architecture", "weights", "class_names"])
def test_json_missing_keys_is_a_clear_error(tmp_path, drop):
    _, meta_path = saved(tmp_path)
    meta = json.loads(meta_path.read_text())
    del meta[drop]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=rf"model\.json: missing key\(s\) \['{drop}'\]"):
        load_checkpoint(tmp_path / "ckpt")


def test_bad_json_and_mismatched_architecture(tmp_path):
    _, meta_path = saved(tmp_path)
    good = json.loads(meta_path.read_text())
    meta_path.write_text("{ truncated")
    with pytest.raises(InputError, match=r"model\.json: not valid JSON"):
        load_checkpoint(tmp_path / "ckpt")
    meta = json.loads(json.dumps(good))
    meta["architecture"]["num_queries"] = 30  # weights hold 20 queries
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"model\.safetensors: weights do not match.*wrong shape.*query"):
        load_checkpoint(tmp_path / "ckpt")
    meta["architecture"] = {**good["architecture"], "hidden_size": 3}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"model\.json.*unknown key model.hidden_size"):
        load_checkpoint(tmp_path / "ckpt")
    meta = {**good, "format_version": 99}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="upgrade castseg"):
        load_checkpoint(tmp_path / "ckpt")


def test_class_names_must_match_num_classes(tmp_path):
    with pytest.raises(CastsegError, match="1 class names given for a model with 2 classes"):
        save_checkpoint(tmp_path / "ckpt", make(), None, ["only-one"], 0)


def test_int8_checkpoint_is_smaller_and_close(tmp_path):
    torch.manual_seed(0)
    model = build_student(StudentConfig.from_preset("tiny", num_classes=2)).eval()
    save_checkpoint(tmp_path / "f32", model, None, ["a", "b"], 0)
    save_checkpoint(tmp_path / "i8", model, None, ["a", "b"], 0, quantize="int8")
    assert (tmp_path / "i8" / "model.safetensors").stat().st_size < 0.4 * (tmp_path / "f32" / "model.safetensors").stat().st_size
    loaded, meta = load_checkpoint(tmp_path / "i8")
    assert meta["weights"]["quantization"] == "int8"
    for k, v in model.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == v.dtype and w.shape == v.shape
        assert (w - v).abs().max() <= v.abs().max() / 127 + 1e-6, k  # at most one int8 step per row
