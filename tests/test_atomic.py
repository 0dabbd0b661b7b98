import os
import stat

import pytest

from castseg.atomic import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_path_renames_on_success_into_created_folders(tmp_path):
    target = tmp_path / "a" / "b" / "model.onnx"
    with atomic_path(target, suffix=".onnx") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.onnx.") and tmp.suffix == ".onnx"
        assert not tmp.exists()  # the writer creates it
        tmp.write_bytes(b"graph")
        assert not target.exists()  # nothing is in place before the block ends
    assert target.read_bytes() == b"graph"
    assert os.listdir(target.parent) == ["model.onnx"]


@pytest.mark.parametrize("half_written", [True, False])
def test_a_failing_writer_leaves_the_target_untouched_and_no_temp_file(tmp_path, half_written):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            if half_written:
                tmp.write_text("half a fi")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_open_streams_text_and_bytes_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "log.csv"
    with atomic_open(target, newline="") as f:
        f.write("step,loss\r\n1,0.5\r\n")
    assert target.read_bytes() == b"step,loss\r\n1,0.5\r\n"  # newline="" writes the csv module's \r\n as is
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target, "wb") as f:
            f.write(b"step")
            raise KeyboardInterrupt  # BaseException too: a Ctrl-C mid-write keeps the old file
    assert target.read_bytes() == b"step,loss\r\n1,0.5\r\n" and os.listdir(tmp_path) == ["log.csv"]
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_open(target, "a"):
            pass


def test_write_text_and_bytes_replace_the_content_with_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    text = atomic_write_text(tmp_path / "new" / "config.yaml", "a: 1\nΔ: 2\n")
    assert text.read_text(encoding="utf-8") == "a: 1\nΔ: 2\n"
    assert stat.S_IMODE(text.stat().st_mode) == 0o666 & ~umask  # not mkstemp's owner-only 0600
    data = atomic_write_bytes(text, b"\x00\x01")
    assert data == text and data.read_bytes() == b"\x00\x01" and os.listdir(tmp_path / "new") == ["config.yaml"]
