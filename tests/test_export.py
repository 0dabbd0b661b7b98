"""`castseg export` to ONNX: onnxruntime parity, refusal on mismatch, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from castseg import cli
from castseg.errors import CastsegError
from castseg.models import build_student, save_checkpoint

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "student"
    torch.manual_seed(0)
    model = build_student({"preset": "tiny", "dec_layers": 2})
    save_checkpoint(path, model, model.config.to_dict(), ["nucleus"], step=0)
    return path


def test_export_matches_torch_and_predicts_the_same(checkpoint, tmp_path, capsys):
    import castseg

    onnx_path = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx_path),
                     "--height", "96", "--width", "128"]) == 0
    assert "identical top-k True" in capsys.readouterr().err  # logged on stderr
    torch_pred, onnx_pred = castseg.load(checkpoint, device="cpu"), castseg.load(onnx_path)
    assert onnx_pred.class_names == ["nucleus"] and onnx_pred.kind == "onnx"
    x = torch.rand(2, 3, 100, 140)  # another size than traced: dynamic H, W and batch
    mt, mo = torch_pred.network.model(x)["pred_masks"], onnx_pred.network.model(x)["pred_masks"]
    assert (mt.sigmoid() - mo.sigmoid()).abs().max() < 1e-3
    a, b = torch_pred(x), onnx_pred(x)
    for ra, rb in zip(a, b):
        assert torch.equal(ra["labels"], rb["labels"]) and torch.allclose(ra["scores"], rb["scores"], atol=1e-4)
        assert (ra["masks"] != rb["masks"]).float().mean() < 1e-3


def test_export_refuses_when_parity_fails(checkpoint, tmp_path, monkeypatch):
    import castseg.export as export

    monkeypatch.setattr(export, "parity", lambda *a, **k: {"max_abs_mask_prob": 0.5, "max_abs_class_prob": 0.0,
                                                            "same_topk": True})
    with pytest.raises(CastsegError, match="export refused"):
        from castseg.models import load_checkpoint

        export.export_onnx(load_checkpoint(checkpoint)[0], ["nucleus"], tmp_path / "m.onnx", 64, 64)
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx*"))


def test_corrupted_onnx_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    code = cli.main(["predict", "--onnx", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.onnx" in err and "ONNX" in err and len(err.strip().splitlines()) == 1
