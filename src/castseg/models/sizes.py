"""Parameter counts and FLOPs of castseg's models, computed from their architectures (no download).

Models are built on the meta device: shapes only, no memory, no weights, so `castseg info`
can state the teacher/student ratio of the paper configuration, and what one forward costs, on
any machine. FLOPs are those :class:`torch.utils.flop_counter.FlopCounterMode` counts on a
meta-device input: matrix products, convolutions and attention, 2 per multiply-add (tables that
count multiply-adds, e.g. fvcore's, give half); element-wise ops, resizing and grid sampling
are not counted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from castseg.errors import CastsegError
from castseg.models.student import PRESETS, StudentConfig, build_student, count_parameters

# Named composite teachers of `castseg info`: (Grounding DINO part, SAM2 part) of paper_teacher_configs.
# "paper" is the paper's configuration (Swin-L detector, 568M in the paper); "base" is the
# detector castseg loads by default (IDEA-Research/grounding-dino-base, as `castseg demo --pretrained`).
TEACHERS = {"teacher-gdino-sam2-paper": ("grounding-dino-large", "sam2.1-hiera-large"),
            "teacher-gdino-sam2-base": ("grounding-dino-base", "sam2.1-hiera-large")}
# Text tokens of the detector pass whose FLOPs are counted: [CLS] + 8 one-token class names,
# each followed by "." + [SEP] (e.g. Cityscapes' 8 thing classes); the real count depends on the prompt.
TEXT_TOKENS = 18
DEFAULT_SIZE = (512, 512)
FLOPS_NOTE = "torch.utils.flop_counter: matmuls, convolutions, attention; 2 FLOPs per multiply-add"


def paper_teacher_configs() -> dict[str, dict[str, Any]]:
    """transformers config kwargs of the paper's teacher parts, from their public configs:
    Grounding DINO with Swin-B and Swin-L (384 px, BERT-base text encoder) and SAM2.1-L."""
    def gdino(embed: int, heads: list[int]) -> dict[str, Any]:
        return dict(backbone_config=dict(model_type="swin", embed_dim=embed, depths=[2, 2, 18, 2], num_heads=heads,
                                         window_size=12, image_size=384, out_indices=[2, 3, 4]),
                    text_config=dict(model_type="bert"))
    hiera_l = dict(model_type="sam2_hiera_det_model", hidden_size=144, num_attention_heads=2,
                   blocks_per_stage=[2, 6, 36, 4], embed_dim_per_stage=[144, 288, 576, 1152],
                   num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 16, 8],
                   global_attention_blocks=[23, 33, 43], window_positional_embedding_background_size=[7, 7])
    sam2_l = dict(vision_config=dict(model_type="sam2_vision_model", backbone_config=hiera_l,
                                     backbone_channel_list=[1152, 576, 288, 144]))
    return {"grounding-dino-base": gdino(128, [4, 8, 16, 32]),
            "grounding-dino-large": gdino(192, [6, 12, 24, 48]),
            "sam2.1-hiera-large": sam2_l}


def teacher_parameter_counts() -> dict[str, int]:
    """Parameters of each paper teacher part (SAM2 in image mode: no video-memory modules)."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, Sam2Config, Sam2Model

    cfgs = paper_teacher_configs()
    with torch.device("meta"):
        return {
            "grounding-dino-base": count_parameters(GroundingDinoForObjectDetection(
                GroundingDinoConfig(**cfgs["grounding-dino-base"]))),
            "grounding-dino-large": count_parameters(GroundingDinoForObjectDetection(
                GroundingDinoConfig(**cfgs["grounding-dino-large"]))),
            "sam2.1-hiera-large": count_parameters(Sam2Model(Sam2Config(**cfgs["sam2.1-hiera-large"]))),
        }


def student_parameter_counts() -> dict[str, int]:
    """Parameters of every student preset (random init on the meta device)."""
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = count_parameters(build_student(StudentConfig.from_preset(name, pretrained=False)))
    return counts


def model_names() -> list[str]:
    """Names `castseg info` accepts besides a checkpoint path."""
    return [*PRESETS, *TEACHERS]


def forward_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` (one forward on meta-device inputs). Autograd stays on: the counter's
    module tracking needs it; on the meta device the graph costs nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def on_meta(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every tensor on the meta device (some transformers modules
    create parameters with legacy constructors that ignore ``torch.device("meta")``)."""
    return model.to("meta").eval()


def student_cost(model: nn.Module, size: tuple[int, int] = DEFAULT_SIZE, flops: bool = True) -> dict[str, Any]:
    """``{"params", "gflops", "size", "counted"}`` of one batch-1 forward of a student-architecture
    model at ``size`` (H, W). The model is moved to the meta device (its weights are dropped)."""
    out: dict[str, Any] = {"params": count_parameters(model), "size": list(size)}
    if flops:
        model = on_meta(model)
        x = torch.zeros(1, 3, *size, device="meta")
        out["gflops"] = forward_flops(lambda: model(x)) / 1e9
        out["counted"] = f"one forward of a 1x3x{size[0]}x{size[1]} image (the model pads to multiples of " \
                         f"{model.config.pad_multiple}); {FLOPS_NOTE}"
    return out


@contextlib.contextmanager
def _tensor_checks_off() -> Iterator[None]:
    """transformers' ``torch_compilable_check`` asserts on tensor values (``.item()``), which
    meta tensors do not have; the shapes they guard are ours, so skip them while counting."""
    old = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = old


def grounded_sam_cost(detector_config: dict[str, Any], segmenter_config: dict[str, Any],
                      size: tuple[int, int] = DEFAULT_SIZE, flops: bool = True, text_tokens: int = TEXT_TOKENS,
                      boxes: int | None = None, detector_size: tuple[int, int] | None = None,
                      detector_name: str = "Grounding DINO") -> dict[str, Any]:
    """Parameters and FLOPs of a Grounding DINO + SAM2 teacher (transformers config kwargs) on a
    batch-1 ``size`` image, part by part: prediction has data-dependent steps (thresholds, NMS,
    a variable number of boxes), so no single forward exists to count. Counted: the detector on
    the image resized as the teacher resizes it (``detector_size``) with ``text_tokens`` tokens;
    SAM2's image encoder at its input size; its prompt encoder + mask decoder for ``boxes``
    prompts (default: the teacher's ``max_detections``). Not counted: post-processing."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, Sam2Config, Sam2Model

    from castseg.models.grounded_sam import DETECTOR_SIZE, MAX_DETECTIONS, fit_size

    boxes = MAX_DETECTIONS if boxes is None else boxes
    with torch.device("meta"):
        det = on_meta(GroundingDinoForObjectDetection(GroundingDinoConfig(**detector_config)))
        sam = on_meta(Sam2Model(Sam2Config(**segmenter_config)))
    dh, dw = fit_size(*size, detector_size or DETECTOR_SIZE)
    s = int(sam.config.prompt_encoder_config.image_size)
    n_enc = count_parameters(sam.vision_encoder)
    parts = [{"part": f"detector ({detector_name})", "params": count_parameters(det),
              "input": f"1x3x{dh}x{dw} image + {text_tokens} text tokens"},
             {"part": "SAM2 image encoder", "params": n_enc, "input": f"1x3x{s}x{s} image"},
             {"part": "SAM2 prompt encoder + mask decoder", "params": count_parameters(sam) - n_enc,
              "input": f"{boxes} box prompts"}]
    out: dict[str, Any] = {"params": sum(p["params"] for p in parts), "size": list(size), "components": parts}
    if not flops:
        return out
    meta = torch.device("meta")
    with _tensor_checks_off():
        ids = torch.zeros(1, text_tokens, dtype=torch.long, device=meta)
        parts[0]["gflops"] = forward_flops(lambda: det(pixel_values=torch.zeros(1, 3, dh, dw, device=meta),
                                                       input_ids=ids, attention_mask=torch.ones_like(ids),
                                                       token_type_ids=torch.zeros_like(ids))) / 1e9
        feats: list[torch.Tensor] = []
        parts[1]["gflops"] = forward_flops(lambda: feats.extend(
            sam.vision_encoder(torch.zeros(1, 3, s, s, device=meta), return_dict=True).fpn_hidden_states)) / 1e9

        def decode() -> None:  # as GroundedSAMTeacher.image_embeddings + decode_masks
            emb = [sam.mask_decoder.conv_s0(feats[0]), sam.mask_decoder.conv_s1(feats[1]), *feats[2:]]
            sam(image_embeddings=emb, input_boxes=torch.zeros(1, boxes, 4, device=meta), multimask_output=False)
        parts[2]["gflops"] = forward_flops(decode) / 1e9
    out["gflops"] = sum(p["gflops"] for p in parts)
    out["counted"] = (f"the parts' forwards, one {size[0]}x{size[1]} image: " + "; ".join(
        f"{p['part']} on {p['input']}" for p in parts) + f"; post-processing (thresholds, NMS, mask resizing) "
        f"not counted; {FLOPS_NOTE}")
    return out


def describe_model(model: str, size: tuple[int, int] = DEFAULT_SIZE, flops: bool = True) -> dict[str, Any]:
    """What `castseg info MODEL` reports: ``{"model", "kind", "params", "gflops", "size",
    "counted", ...}`` for a student preset, a named teacher (:data:`TEACHERS`) or a castseg
    checkpoint (folder, ``.safetensors`` or ``.json``; also ``class_names``, ``step``)."""
    if model in PRESETS:
        with torch.device("meta"):
            net = build_student(StudentConfig.from_preset(model, pretrained=False))
        return {"model": model, "kind": "student preset", **student_cost(net, size, flops)}
    if model in TEACHERS:
        det, seg = TEACHERS[model]
        cfgs = paper_teacher_configs()
        out = grounded_sam_cost(cfgs[det], cfgs[seg], size, flops, detector_name=det)
        return {"model": model, "kind": f"teacher ({det} + {seg})", **out}
    from castseg.models.checkpoint import checkpoint_paths, load_checkpoint

    if not (Path(model).exists() or any(p.is_file() for p in checkpoint_paths(model))):
        raise CastsegError(f"unknown model {model!r}: give a student preset ({', '.join(PRESETS)}), a teacher "
                           f"({', '.join(TEACHERS)}) or a castseg checkpoint (a folder with model.json and "
                           f"model.safetensors, or one of those files)")
    net, meta = load_checkpoint(model)
    return {"model": str(model), "kind": "checkpoint", "class_names": meta.get("class_names"),
            "step": meta.get("step"), **student_cost(net, size, flops)}
