"""The paper's teacher: Grounding DINO (text-prompted boxes) + SAM2 (a mask per box).

For ``images [B,3,H,W]`` in [0,1] and C class names: (1) prompt = lower-cased names joined by
``" . "``, ending ``" ."`` (split into several prompts, one detector pass each, if the names exceed
the text encoder's token budget); (2) Grounding DINO → boxes; a query's score for class c is its
highest token probability inside c's phrase (the token run between delimiters — the grouping
transformers' own loss uses), so multi-word names map back to their class without decoding text;
label = best class, kept above ``box_threshold``/``text_threshold``, class-aware box NMS, top
``max_detections``; (3) SAM2 with the boxes as prompts → one mask per box (``multimask_output=
False``), resized to ``(H, W)``; each mask takes its box's class and score.

Images are resized and normalised in torch; only the tokenizer of the processors is used.
Adaptation (:meth:`GroundedSAMTeacher.loss`) = Grounding DINO's own detection loss + BCE and Dice
between SAM2's mask for each ground-truth box and the ground-truth mask (SAM2's image encoder
frozen by default).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from castseg import __version__
from castseg.errors import CastsegError
from castseg.models.teacher import Instances, Teacher, empty_instances, masks_to_boxes, nms

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-base"
DEFAULT_SEGMENTER = "facebook/sam2.1-hiera-large"
# (shortest, longest) edge of the detector input, as Grounding DINO's processor resizes; boxes
# (= SAM2 mask prompts) kept per image.
DETECTOR_SIZE = (800, 1333)
MAX_DETECTIONS = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_JSON = "teacher.json"
FORMAT = "castseg-grounded-sam-teacher"
# Constructor options stored in teacher.json (the models themselves go to sub-folders).
SAVED_OPTIONS = ("box_threshold", "text_threshold", "nms_iou", "mask_threshold", "max_detections",
                 "train_detector", "train_mask_decoder", "train_image_encoder", "detector_size",
                 "det_loss_weight", "mask_bce_weight", "mask_dice_weight", "max_mask_prompts", "box_chunk")


def normalize_class_name(name: str) -> str:
    """Lower-case, ``_`` and the delimiters ``.``/``?`` turned into spaces (a delimiter inside a
    name would split it into two phrases), whitespace collapsed."""
    out = " ".join(str(name).lower().replace("_", " ").replace(".", " ").replace("?", " ").split())
    if not out:
        raise CastsegError(f"class name {name!r} is empty once punctuation is removed; give it a word")
    return out


def build_prompt(class_names: Sequence[str]) -> str:
    """``["Cat", "traffic light"]`` → ``"cat . traffic light ."``."""
    return " . ".join(normalize_class_name(n) for n in class_names) + " ."


def chunk_classes(token_counts: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split classes (by their names' token counts) into consecutive groups whose prompt
    (``[CLS]`` + each name and its ``.`` + ``[SEP]``) fits in ``max_tokens``."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    used = 2
    for i, n in enumerate(token_counts):
        if 2 + n + 1 > max_tokens:
            raise CastsegError(f"class name {i} takes {n} tokens; the detector's text limit is {max_tokens}")
        if used + n + 1 > max_tokens:
            chunks.append(cur)
            cur, used = [], 2
        cur.append(i)
        used += n + 1
    return chunks + ([cur] if cur else [])


def phrase_token_map(input_ids: Tensor, delimiter_ids: Tensor, length: int) -> Tensor:
    """``input_ids [T]`` → bool ``[G, length]``: row g marks the tokens of the g-th phrase (a run of
    non-delimiter tokens), the grouping of transformers' ``build_label_maps``."""
    delim = torch.isin(input_ids, delimiter_ids.to(input_ids.device))
    group = torch.cumsum(delim.long(), 0) * (~delim).long()
    ids = group.unique()
    ids = ids[ids > 0]
    m = group[None, :] == ids[:, None]
    return F.pad(m, (0, length - m.shape[1]))[:, :length]


def fit_size(h: int, w: int, size: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` scaled (aspect kept) so the shortest edge is ``size[0]`` unless the longest
    would then exceed ``size[1]``."""
    short, long_ = size
    scale = min(short / min(h, w), long_ / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def load_hf(loader: Any, name: str, option: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, **kwargs)`` for a hub id or a local folder; failures become
    one :class:`CastsegError` line naming ``name`` and how to provide a local copy."""
    local = Path(name).expanduser()
    hint = (f"On a connected machine run `huggingface-cli download {name} --local-dir DIR`, copy DIR here "
            f"and pass DIR as the teacher's {option!r}")
    if local.exists():
        try:
            return loader.from_pretrained(str(local), **kwargs)
        except (OSError, ValueError) as e:
            raise CastsegError(f"teacher {option} folder {name} could not be loaded ({e}); it should be a folder "
                               f"written by `huggingface-cli download` or save_pretrained") from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CastsegError(f"teacher {option} folder {name} does not exist. {hint}")
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        offline = any(os.environ.get(k, "0") not in ("0", "", "false", "False")
                      for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        why = "is not in the local cache and the hub is offline (HF_HUB_OFFLINE)" if offline else \
            f"could not be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
        raise CastsegError(f"teacher {option} {name!r} {why}. {hint}") from None


class GroundedSAMTeacher(Teacher):
    """Grounding DINO + SAM2 teacher (see the module docstring).

    Args:
        detector, segmenter: hub ids or local folders of the Grounding DINO / SAM2 weights.
        box_threshold, text_threshold: minimum class score of a kept box (both must be exceeded).
        nms_iou: class-aware box NMS IoU; max_detections: boxes (= masks) kept per image.
        mask_threshold: SAM2 logit above which a pixel is in the mask (0 = probability 0.5).
        train_detector, train_mask_decoder, train_image_encoder: what :meth:`loss` adapts (SAM2's
            mask decoder includes its prompt encoder; its image encoder is frozen by default).
        pretrained: load weights; ``False`` builds random models from ``detector_config`` /
            ``segmenter_config`` (dicts or transformers configs) — tests, CPU smoke runs.
        tokenizer: folder/id of the text tokenizer (default: the detector's).
        class_names: default class names of :meth:`predict` / :meth:`loss`, saved with the teacher.
        detector_size: ``(shortest, longest)`` edge of the detector input (aspect kept).
        det_loss_weight, mask_bce_weight, mask_dice_weight: weights of the adaptation terms.
        max_mask_prompts: ground-truth boxes per image sent to SAM2 in :meth:`loss` (random
            subset beyond; bounds memory on crowded images). box_chunk: boxes decoded at once.
    """

    def __init__(self, detector: str = DEFAULT_DETECTOR, segmenter: str = DEFAULT_SEGMENTER,
                 box_threshold: float = 0.3, text_threshold: float = 0.25, nms_iou: float = 0.7,
                 mask_threshold: float = 0.0, max_detections: int = MAX_DETECTIONS, train_detector: bool = True,
                 train_mask_decoder: bool = True, train_image_encoder: bool = False, pretrained: bool = True,
                 detector_config: dict | Any | None = None, segmenter_config: dict | Any | None = None,
                 tokenizer: str | None = None, class_names: Sequence[str] | None = None,
                 detector_size: Sequence[int] = DETECTOR_SIZE, det_loss_weight: float = 1.0,
                 mask_bce_weight: float = 5.0, mask_dice_weight: float = 5.0, max_mask_prompts: int = 32,
                 box_chunk: int = 32):
        super().__init__(class_names)
        from transformers import (AutoTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, Sam2Config,
                                  Sam2Model)

        args = locals()
        for k in SAVED_OPTIONS:  # plain attributes; save_pretrained writes them to teacher.json
            setattr(self, k, args[k])
        self.detector_size = tuple(int(v) for v in detector_size)
        self.tokenizer = load_hf(AutoTokenizer, tokenizer or detector, "tokenizer")
        if pretrained:
            # fp32 master weights whatever the folder stores (a bf16 upload would otherwise train
            # in bf16: updates below its precision vanish); amp decides the compute dtype
            self.detector = load_hf(GroundingDinoForObjectDetection, detector, "detector", dtype=torch.float32)
            self.segmenter = load_hf(Sam2Model, segmenter, "segmenter", dtype=torch.float32)
        else:
            def cfg(c: Any, cls: Any) -> Any:
                return cls(**c) if isinstance(c, dict) else (c if c is not None else cls())
            self.detector = GroundingDinoForObjectDetection(cfg(detector_config, GroundingDinoConfig))
            self.segmenter = Sam2Model(cfg(segmenter_config, Sam2Config))
        self.detector.requires_grad_(train_detector)
        self.segmenter.requires_grad_(train_mask_decoder)
        # The image path (Hiera + FPN neck + the video "no memory" token) is not prompt-dependent.
        self.segmenter.vision_encoder.requires_grad_(train_image_encoder)
        self.segmenter.no_memory_embedding.requires_grad_(train_image_encoder)
        self.segmenter_size = int(self.segmenter.config.prompt_encoder_config.image_size)
        # Grounding DINO splits phrases at these ids (its [CLS] [SEP] . ?), padding included.
        delim = self.detector.model.special_tokens.tolist() + [self.tokenizer.pad_token_id or 0]
        self.register_buffer("delimiter_ids", torch.tensor(delim, dtype=torch.long), persistent=False)
        dot = self.tokenizer.convert_tokens_to_ids(".")
        if dot not in delim or self.tokenizer.cls_token_id not in delim:
            raise CastsegError(f"the tokenizer's '.'/[CLS] ids ({dot}, {self.tokenizer.cls_token_id}) are not "
                               f"Grounding DINO's delimiters {delim[:4]}: use the detector's own tokenizer")
        tc = self.detector.config.text_config
        self.max_text_tokens = min(int(self.detector.config.max_text_len), int(tc.max_position_embeddings))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def backbone_prefixes(self) -> tuple[str, ...]:
        # Grounding DINO's Swin and BERT, SAM2's Hiera: pretrained on far more data than the
        # adaptation set; the fusion layers, decoders and heads adapt at the full rate.
        return ("detector.model.backbone.", "detector.model.text_backbone.", "segmenter.vision_encoder.")

    def train(self, mode: bool = True) -> "GroundedSAMTeacher":
        super().train(mode)
        if not self.train_image_encoder:
            self.segmenter.vision_encoder.eval()  # frozen parts stay deterministic
        if not self.train_detector:
            self.detector.eval()
        return self

    # ------------------------------------------------------------ inputs
    def _normalize(self, x: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return ((x.float() - self.pixel_mean) / self.pixel_std).to(dtype)

    def detector_input_size(self, h: int, w: int) -> tuple[int, int]:
        """Shortest edge → ``detector_size[0]`` unless the longest would exceed ``detector_size[1]``."""
        return fit_size(h, w, self.detector_size)

    def prompts(self, class_names: Sequence[str]) -> list[tuple[list[int], str]]:
        """``(class indices, prompt)`` per detector pass (one unless the names exceed the limit)."""
        names = [normalize_class_name(n) for n in class_names]
        if len(set(names)) != len(names):
            raise CastsegError(f"class names must differ once normalised for the text prompt: {names}")
        counts = [len(self.tokenizer(n, add_special_tokens=False)["input_ids"]) for n in names]
        return [(idx, build_prompt([names[i] for i in idx])) for idx in chunk_classes(counts, self.max_text_tokens)]

    def _run_detector(self, pixels: Tensor, prompt: str, n_classes: int, labels: list[dict] | None = None) -> Any:
        enc = self.tokenizer([prompt] * pixels.shape[0], return_tensors="pt", padding=True).to(pixels.device)
        out = self.detector(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            token_type_ids=enc.get("token_type_ids"), labels=labels)  # pixel_mask: all valid
        token_map = phrase_token_map(enc["input_ids"][0], self.delimiter_ids, out.logits.shape[-1])
        if len(token_map) != n_classes:  # would silently shift every class index: refuse instead
            raise CastsegError(f"prompt {prompt!r} has {len(token_map)} phrases for {n_classes} classes")
        return out, token_map

    # ------------------------------------------------------------ prediction
    def detect(self, images: Tensor, class_names: Sequence[str]) -> list[dict[str, Tensor]]:
        """Boxes per image: ``{"boxes": xyxy float [K,4] in input pixels, "scores": [K] descending,
        "labels": int64 [K]}`` after thresholds, class-aware NMS and ``max_detections``."""
        b, _, h, w = images.shape
        pixels = self._normalize(images, self.detector_input_size(h, w), self.detector.dtype)
        cand: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(b)]
        for idx, prompt in self.prompts(class_names):
            out, token_map = self._run_detector(pixels, prompt, len(idx))
            probs = out.logits.float().sigmoid()  # [B, Q, T]
            # phrases are contiguous token runs: max over slices, no [B, Q, C, T] intermediate
            spans = [(int(r.nonzero()[0]), int(r.nonzero()[-1]) + 1) for r in token_map]
            score, local = torch.stack([probs[..., s:e].amax(-1) for s, e in spans], -1).max(-1)  # [B, Q]
            cx, cy, bw, bh = out.pred_boxes.float().unbind(-1)
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            boxes = (boxes * boxes.new_tensor([w, h, w, h])).clamp(min=0)
            boxes = torch.minimum(boxes, boxes.new_tensor([w, h, w, h]))
            glob = torch.as_tensor(idx, device=local.device)[local]
            for i in range(b):
                cand[i].append((boxes[i], score[i], glob[i]))
        results = []
        thr = max(self.box_threshold, self.text_threshold)
        for parts in cand:
            boxes, scores, labels = (torch.cat(t) for t in zip(*parts))
            keep = scores > thr
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = nms(boxes, scores, self.nms_iou, labels)[: self.max_detections]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    def image_embeddings(self, images: Tensor) -> list[Tensor]:
        """SAM2 image features ``[B,C_l,h_l,w_l]`` per level, as ``Sam2Model.get_image_embeddings``
        gives them, but with the mask decoder's own projections (``conv_s0/conv_s1``) outside the
        frozen encoder's no-grad block, so they are adapted with the decoder."""
        sam = self.segmenter
        pixels = self._normalize(images, (self.segmenter_size, self.segmenter_size), sam.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_image_encoder):
            feats = list(sam.vision_encoder(pixels, return_dict=True).fpn_hidden_states)
            feats[-1] = feats[-1] + sam.no_memory_embedding.view(1, -1, 1, 1)
        feats[0] = sam.mask_decoder.conv_s0(feats[0])
        feats[1] = sam.mask_decoder.conv_s1(feats[1])
        return feats

    def decode_masks(self, embeddings: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """Low-res mask logits ``[K, s, s]`` for xyxy ``boxes [K,4]`` in SAM2 input pixels, given
        one image's ``embeddings`` (each ``[1,C,h,w]``)."""
        out = self.segmenter(image_embeddings=list(embeddings), input_boxes=boxes[None], multimask_output=False)
        return out.pred_masks[0, :, 0]

    def _predict(self, images: Tensor, class_names: list[str]) -> list[Instances]:
        h, w = images.shape[-2:]
        dets = self.detect(images, class_names)
        emb = self.image_embeddings(images)
        to_sam = images.new_tensor([self.segmenter_size / w, self.segmenter_size / h] * 2)
        results = []
        for i, d in enumerate(dets):
            if len(d["boxes"]) == 0:
                results.append(empty_instances(h, w, images.device))
                continue
            masks = []
            for s in range(0, len(d["boxes"]), self.box_chunk):
                logits = self.decode_masks([e[i:i + 1] for e in emb], d["boxes"][s:s + self.box_chunk] * to_sam)
                up = F.interpolate(logits[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
                masks.append(up[:, 0] > self.mask_threshold)
            results.append({"masks": torch.cat(masks), "scores": d["scores"], "labels": d["labels"]})
        return results

    # ------------------------------------------------------------ adaptation
    def loss(self, images: Tensor, targets: Sequence[dict[str, Tensor]],
             class_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Adaptation loss on labeled images; returns ``loss_det`` (Grounding DINO's weighted
        detection loss), ``loss_mask_bce``, ``loss_mask_dice`` and their weighted sum ``loss``
        (plus the detector's unweighted terms, detached, as ``det_*``)."""
        names = self.resolve_class_names(class_names)
        if not (self.train_detector or self.train_mask_decoder or self.train_image_encoder):
            raise CastsegError("nothing to adapt: train_detector, train_mask_decoder and train_image_encoder are off")
        images = images.to(self.device)
        b, _, h, w = images.shape
        if len(targets) != b:
            raise ValueError(f"got {len(targets)} targets for {b} images")
        gt = []
        for t in targets:
            masks = t["masks"].to(images.device).bool()
            if tuple(masks.shape[-2:]) != (h, w):
                raise ValueError(f"target masks are {list(masks.shape[-2:])}, images {[h, w]}")
            keep = masks.flatten(1).any(1)  # an empty mask has no box
            gt.append((masks[keep], t["labels"].to(images.device).long()[keep], masks_to_boxes(masks[keep])))
        zero = images.new_zeros(())
        out: dict[str, Tensor] = {"loss_det": zero, "loss_mask_bce": zero, "loss_mask_dice": zero}
        if self.train_detector:
            out.update(self._detector_loss(images, gt, names))
        if self.train_mask_decoder or self.train_image_encoder:
            out["loss_mask_bce"], out["loss_mask_dice"] = self._mask_loss(images, gt)
        out["loss"] = (self.det_loss_weight * out["loss_det"] + self.mask_bce_weight * out["loss_mask_bce"]
                       + self.mask_dice_weight * out["loss_mask_dice"])
        return out

    def _detector_loss(self, images: Tensor, gt: list[tuple[Tensor, Tensor, Tensor]],
                       names: list[str]) -> dict[str, Tensor]:
        h, w = images.shape[-2:]
        pixels = self._normalize(images, self.detector_input_size(h, w), self.detector.dtype)
        scale = images.new_tensor([w, h, w, h])
        chunks = self.prompts(names)
        total, terms = images.new_zeros(()), {}
        for idx, prompt in chunks:
            local = torch.full((len(names),), -1, dtype=torch.long, device=images.device)
            local[torch.as_tensor(idx, device=images.device)] = torch.arange(len(idx), device=images.device)
            labels = []
            for _, lab, boxes in gt:
                sel = local[lab] >= 0  # this pass only knows its own classes
                x0, y0, x1, y1 = (boxes[sel] / scale).unbind(-1)
                labels.append({"class_labels": local[lab][sel],
                               "boxes": torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)})
            # All images share the prompt, so transformers' per-image label-map offsets (which
            # assume equal class counts per image) are exact here.
            det, _ = self._run_detector(pixels, prompt, len(idx), labels)
            total = total + det.loss / len(chunks)
            for k, v in (det.loss_dict or {}).items():
                terms[f"det_{k}"] = terms.get(f"det_{k}", 0) + v.detach() / len(chunks)
        return {"loss_det": total, **terms}

    def _mask_loss(self, images: Tensor, gt: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        h, w = images.shape[-2:]
        emb = self.image_embeddings(images)
        to_sam = images.new_tensor([self.segmenter_size / w, self.segmenter_size / h] * 2)
        bce, dice, n = images.new_zeros(()), images.new_zeros(()), 0
        for i, (masks, _, boxes) in enumerate(gt):
            if len(masks) == 0:
                continue
            if len(masks) > self.max_mask_prompts:
                pick = torch.randperm(len(masks), device=masks.device)[: self.max_mask_prompts]
                masks, boxes = masks[pick], boxes[pick]
            logits = self.decode_masks([e[i:i + 1] for e in emb], boxes * to_sam).float()  # [N, s, s]
            # SAM2's low-res grid is the image stretched to a square, as in prediction; compare
            # there (soft, antialiased targets) rather than upsampling N logit maps.
            target = F.interpolate(masks[:, None].float(), size=logits.shape[-2:], mode="bilinear",
                                   align_corners=False, antialias=True)[:, 0].clamp(0, 1)
            bce = bce + F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2)).sum()
            p = logits.sigmoid().flatten(1)
            t = target.flatten(1)
            dice = dice + (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum()
            n += len(masks)
        if n == 0:  # keep the graph connected (DDP) when no image has an object
            z = sum(e.sum() for e in emb) * 0.0
            return z, z
        return bce / n, dice / n

    # ------------------------------------------------------------ saving
    def options(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k in SAVED_OPTIONS for v in [getattr(self, k)]}

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``detector/`` (Grounding DINO + tokenizer), ``segmenter/`` (SAM2), both in
        transformers format (safetensors), and ``teacher.json`` (class names, options)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.detector.save_pretrained(path / "detector")
        self.tokenizer.save_pretrained(path / "detector")
        self.segmenter.save_pretrained(path / "segmenter")
        meta = {"format": FORMAT, "format_version": 1, "castseg_version": __version__,
                "class_names": self.class_names, "options": self.options()}
        (path / TEACHER_JSON).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "GroundedSAMTeacher":
        """Load a teacher written by :meth:`save_pretrained`; ``overrides`` replace stored options."""
        path = Path(path)
        meta_path = path / TEACHER_JSON
        if not meta_path.is_file():
            raise CastsegError(f"{path}: not a saved grounded-SAM teacher (no {TEACHER_JSON})")
        try:
            meta = json.loads(meta_path.read_text())
            options = dict(meta["options"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise CastsegError(f"{meta_path}: unreadable teacher description ({e})") from None
        kw = {"detector": str(path / "detector"), "segmenter": str(path / "segmenter"),
              "tokenizer": str(path / "detector"), "pretrained": True, **options,
              "class_names": meta.get("class_names"), **overrides}
        return cls(**kw)
