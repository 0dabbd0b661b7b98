"""`castseg demo` on the embedded default: the path `make demo` runs."""

import json

from castseg import cli
from castseg.commands.demo import embedded_default
from castseg.data.coco_io import load_coco


def test_embedded_default_is_valid_and_complete():
    coco = load_coco(embedded_default())
    assert len(coco.images) == 107 and len(coco.annotations) == 4550
    assert coco.class_names == ["nucleus"]
    assert all(coco.image_path(img).exists() for img in coco.images)


def test_demo_quick_writes_splits_predictions_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["classical_baseline"]
    assert 0.0 < row["AP"] <= row["AP50"] <= 1.0
    assert metrics["val_images"] == 5
    manifest = json.loads((out / "splits" / "split.json").read_text())
    assert manifest["counts"] == {"images": 107, "labeled": 9, "unlabeled": 82, "val": 16,
                                  "labeled_annotations": manifest["counts"]["labeled_annotations"],
                                  "val_annotations": manifest["counts"]["val_annotations"]}
    preds = json.loads((out / "predictions" / "classical_val.json").read_text())
    assert preds and {"image_id", "category_id", "score", "segmentation"} <= set(preds[0])
    assert "mask AP" in capsys.readouterr().out
