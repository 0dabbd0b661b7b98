"""Rebuild the embedded default dataset (src/castseg/assets/dsb2018_histology) from DSB2018.

The embedded default is the *target domain* of the demo: all colour (H&E histology) images of
the DSB2018 stage-1 training set. The rule is by modality, never by chance: an image is colour
when its RGB channels are not identical. The grey images (fluorescence and brightfield) are the
source domain that the pretrained stand-ins are trained on, so the demo's target is unseen.

    python tools/make_embedded_default.py ../shared/data/dsb2018-stage1-train/stage1_train

Images are re-saved as RGB PNG (the originals are RGBA with a constant alpha of 255; pixels are
unchanged); masks become COCO RLE via the project's own `mask-folders` converter.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from castseg.data.coco_io import write_json
from castseg.data.convert import convert

DEST = Path(__file__).resolve().parents[1] / "src" / "castseg" / "assets" / "dsb2018_histology"


def is_colour(png: Path) -> bool:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def main() -> None:
    from castseg.console import install

    install()  # castseg's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage1_train", type=Path)
    args = ap.parse_args()
    ids = sorted(d.name for d in args.stage1_train.iterdir() if is_colour(d / "images" / f"{d.name}.png"))
    print(f"{len(ids)} colour images")
    (DEST / "images").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The converter sees only the selected ids (symlinks: nothing of the source is touched).
        for i in ids:
            (Path(tmp) / i).symlink_to((args.stage1_train / i).resolve(), target_is_directory=True)
        coco = convert("mask-folders", Path(tmp))
    for img in coco["images"]:
        sid = Path(img["file_name"]).stem
        out = DEST / "images" / f"{sid}.png"
        Image.open(args.stage1_train / sid / "images" / f"{sid}.png").convert("RGB").save(out, optimize=True)
        img["file_name"] = f"images/{sid}.png"
    coco.pop("images_root", None)  # file names are now relative to the json's own folder
    coco["info"] = {
        "description": "DSB2018 stage1_train, colour (H&E histology) subset, embedded castseg default",
        "licence": "CC0 1.0 (public domain); see README.md",
        "source_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }
    write_json(coco, DEST / "annotations.json")
    print(f"wrote {len(coco['images'])} images, {len(coco['annotations'])} annotations to {DEST}")


if __name__ == "__main__":
    main()
