"""`castseg info`: the model sizes a user compares against the paper."""

import json

from castseg import cli


def test_info_reports_paper_sizes(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["student_params"]["small"] - 52e6) / 52e6 < 0.15   # paper: 52M
    assert info["teacher_student_ratio"] >= 10                          # paper: ~11x
    assert info["student_params"]["tiny"] < info["student_params"]["small"] < info["student_params"]["large"]


def test_info_describes_a_checkpoint(tmp_path, capsys):
    from castseg.models import build_student, save_checkpoint

    model = build_student("tiny")
    save_checkpoint(tmp_path / "ckpt", model, model.config.to_dict(), ["nucleus"], step=7)
    assert cli.main(["info", "--checkpoint", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "classes ['nucleus']" in out and "step 7" in out
