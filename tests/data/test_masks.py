import numpy as np
import pytest

from castseg.data import masks as M
from castseg.errors import InputError


def test_encode_decode_roundtrip_area_bbox():
    m = np.zeros((7, 9), np.uint8)
    m[2:5, 3:8] = 1
    rle = M.encode(m)
    assert rle["size"] == [7, 9] and isinstance(rle["counts"], str)
    assert (M.decode(rle) == m).all()
    assert M.area(rle) == 15
    assert M.bbox(rle) == [3.0, 2.0, 5.0, 3.0]
    assert M.encode_batch(np.stack([m, 1 - m]))[0] == rle


def test_polygon_to_rle_area():
    rle = M.segmentation_to_rle([[1, 1, 5, 1, 5, 4, 1, 4]], 8, 8, "x")
    assert 12 <= M.area(rle) <= 20  # a 4x3 square, rasterised


@pytest.mark.parametrize("segm, msg", [
    ([[1, 1, 5, 1]], "at least 3"),
    ([[1, 1, 5]], "odd number"),
    ([], "empty polygon"),
    ({"size": [4, 4], "counts": "0"}, "does not match"),
    ({"size": [8, 8], "counts": [1, 2]}, "sum to 3"),
    ({"counts": "x"}, "needs 'size'"),
    ("nonsense", "polygon list or an RLE"),
])
def test_bad_segmentations(segm, msg):
    with pytest.raises(InputError, match=msg):
        M.segmentation_to_rle(segm, 8, 8, "ann.json: annotation #0")


def test_overlap_is_iou_or_share_inside_and_union_covers_all():
    a, b = np.zeros((10, 12), np.uint8), np.zeros((10, 12), np.uint8)
    a[0:4, 0:5] = 1   # 20 px
    b[2:6, 0:5] = 1   # 20 px, 10 of them shared with a
    ra, rb = M.encode(a), M.encode(b)
    iou = M.overlap([ra, rb], [rb])
    assert iou.shape == (2, 1) and iou[0, 0] == pytest.approx(10 / 30) and iou[1, 0] == 1.0
    # share of each dt inside the gt: |a ∩ b| / |a|, not symmetric in size
    big = np.zeros_like(a)
    big[0:10, 0:12] = 1
    inside = M.overlap([ra, M.encode(big)], [ra], inside=True)
    assert inside[0, 0] == 1.0 and inside[1, 0] == pytest.approx(20 / 120)
    assert M.overlap([], [ra]).shape == (0, 1)
    u = M.union([ra, rb])
    assert M.area(u) == 30 and (M.decode(u) == (a | b)).all()
