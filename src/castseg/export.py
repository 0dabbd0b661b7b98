"""ONNX export of a student checkpoint, refused unless onnxruntime reproduces torch.

The graph takes ``images [B,3,H,W]`` (float, [0,1]) and returns the final decoder layer's
``pred_logits [B,Q,C+1]`` and ``pred_masks [B,Q,Hp/4,Wp/4]``; post-processing stays in Python
(`castseg.models.inference`), shared with the torch path. Class names go into the file's
metadata so `castseg predict --onnx` needs nothing else.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from castseg.atomic import atomic_path
from castseg.errors import CastsegError


class _Heads(torch.nn.Module):
    """The model with only the outputs deployment needs (no aux layers, no embeddings)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_masks"]


def parity(model: torch.nn.Module, onnx_path: Path, sample: torch.Tensor, topk: int = 100) -> dict[str, float]:
    """Max |Δ| of mask probabilities and of class probabilities between torch and onnxruntime
    on ``sample``, and whether the top-k instances (query, class) are identical."""
    from castseg.models.onnx_network import OnnxNetwork

    with torch.no_grad():
        ref_logits, ref_masks = _Heads(model)(sample)
    out = OnnxNetwork(onnx_path)(sample)
    ort_logits, ort_masks = out["pred_logits"], out["pred_masks"]
    dm = float((ort_masks.sigmoid() - ref_masks.sigmoid()).abs().max())
    dc = float((ort_logits.softmax(-1) - ref_logits.softmax(-1)).abs().max())
    k = min(topk, ref_logits[..., :-1].numel() // len(ref_logits))
    same = all(torch.equal(a[..., :-1].softmax(-1).flatten().topk(k).indices.sort().values,
                           b[..., :-1].softmax(-1).flatten().topk(k).indices.sort().values)
               for a, b in zip(ref_logits.softmax(-1), ort_logits.softmax(-1)))
    return {"max_abs_mask_prob": dm, "max_abs_class_prob": dc, "same_topk": bool(same)}


def export_onnx(model: torch.nn.Module, class_names: list[str], out: str | Path, height: int = 512,
                width: int = 512, dynamic_size: bool = True, opset: int = 17, tolerance: float = 1e-3,
                sample: torch.Tensor | None = None, source: str = "") -> dict[str, object]:
    """Export a student network (``castseg.load(...).export`` hands it over) to ``out`` and check
    parity; the file is only moved into place when parity holds (max |Δ| mask probability <
    ``tolerance`` and identical top-k). ``source`` (the checkpoint) goes into the metadata."""
    import copy

    import onnx

    if opset < 17:
        raise CastsegError(f"opset {opset} is too old; castseg exports with opset >= 17")
    model = copy.deepcopy(model).float().cpu().eval()
    out = Path(out)
    example = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    with atomic_path(out, suffix=".onnx") as tmp:
        # Trace warnings are about shape-dependent Python branches; the parity check below (at
        # another size than traced, in the tests) is what proves the graph generalises.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(_Heads(model), (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["pred_logits", "pred_masks"],
                              dynamic_axes={"images": axes, "pred_logits": {0: "batch"},
                                            "pred_masks": {0: "batch", 2: "mask_h", 3: "mask_w"}})
        proto = onnx.load(str(tmp))
        for key, value in (("class_names", json.dumps(list(class_names))), ("castseg_checkpoint", source),
                           ("input", "images [B,3,H,W] float RGB in [0,1]")):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        check = sample if sample is not None else torch.rand(1, 3, height, width,
                                                              generator=torch.Generator().manual_seed(1))
        report = parity(model, tmp, check)
        if not (report["max_abs_mask_prob"] < tolerance and report["same_topk"]):
            raise CastsegError(f"{out}: export refused, onnxruntime does not reproduce torch "
                               f"(max |Δ| mask probability {report['max_abs_mask_prob']:.2e}, tolerance "
                               f"{tolerance:.0e}; identical top-k: {report['same_topk']})")
    return {"path": str(out), "opset": opset, "dynamic_size": dynamic_size, **report}
