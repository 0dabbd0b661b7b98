"""An exported student (``castseg export``) as a network: onnxruntime behind the torch outputs.

:class:`OnnxNetwork` returns the same ``{"pred_logits", "pred_masks"}`` as the torch student, so
an ONNX file goes through the one instance path (:class:`~castseg.models.teacher.ModelTeacher`
→ :func:`castseg.models.inference.outputs_to_instances`) like any checkpoint. It has no
parameters and runs on the CPU (or CUDA with onnxruntime-gpu); it cannot be trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from castseg.errors import InputError


def onnx_class_names(path: str | Path) -> list[str]:
    """Class names stored in the file's metadata by ``castseg export`` (``["object"]`` if none)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises its own (and protobuf's) exception types for bad files
        raise InputError(path, f"not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta.get("class_names", "[]")) or ["object"]


class OnnxNetwork(nn.Module):
    """``forward(images [B,3,H,W] float in [0,1]) -> {"pred_logits" [B,Q,C+1], "pred_masks"
    [B,Q,H/4,W/4]}`` computed by onnxruntime.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime's intra-op threads (None: its default).
        cuda: try the CUDA execution provider first.
    """

    def __init__(self, path: str | Path, threads: int | None = None, cuda: bool = False):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise InputError(path, f"not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self.path = Path(path)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        logits, masks = self.session.run(["pred_logits", "pred_masks"],
                                         {"images": images.detach().float().cpu().numpy()})
        return {"pred_logits": torch.from_numpy(logits), "pred_masks": torch.from_numpy(masks)}
