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
