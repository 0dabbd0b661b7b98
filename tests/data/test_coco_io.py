import json
import os
from pathlib import Path

import numpy as np
import pytest

from castseg.data import masks as M
from castseg.data.coco_io import load_coco, resolve_in_root
from castseg.errors import InputError


def test_symlinked_dataset_folder_is_inside_root(tmp_path: Path):
    # Datasets often live on another disk behind a symlink; that is not an escape.
    real = tmp_path / "disk2" / "imgs"
    real.mkdir(parents=True)
    root = tmp_path / "project"
    root.mkdir()
    os.symlink(real, root / "imgs")
    assert resolve_in_root(root, "imgs/a.png") == root.absolute() / "imgs" / "a.png"
    for bad in ("../disk2/imgs/a.png", "imgs/../../x.png", str(real / "a.png")):
        with pytest.raises(InputError, match="escapes the images root"):
            resolve_in_root(root, bad)


def test_load_normalises_area_bbox_and_keeps_ids(tmp_path: Path):
    m = np.zeros((10, 12), np.uint8)
    m[2:6, 3:9] = 1
    data = {"images": [{"id": 7, "file_name": "a.png", "width": 12, "height": 10}],
            "categories": [{"id": 3, "name": "cell"}],
            "annotations": [{"id": 11, "image_id": 7, "category_id": 3, "area": 999, "bbox": [0, 0, 1, 1],
                             "segmentation": M.encode(m)}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    coco = load_coco(tmp_path / "a.json")
    ann = coco.annotations[0]
    assert (ann["id"], ann["area"], ann["bbox"], ann["iscrowd"]) == (11, 24.0, [3.0, 2.0, 6.0, 4.0], 0)
    assert coco.image_path(coco.images[0]) == tmp_path.absolute() / "a.png"
    assert coco.anns_by_image[7] == [ann]


def test_image_list_json_needs_flag(tmp_path: Path):
    (tmp_path / "u.json").write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(InputError, match="missing top-level key 'annotations'"):
        load_coco(tmp_path / "u.json")
    assert load_coco(tmp_path / "u.json", require_annotations=False).annotations == []
