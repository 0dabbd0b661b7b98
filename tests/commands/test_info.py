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


# ---------------------------------------------------------------- castseg info MODEL_OR_CKPT

def info_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert cli.main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_of_a_preset_counts_its_parameters_and_flops(capsys):
    import torch

    from castseg.models import StudentConfig, build_student

    info = info_json(capsys, "lite_student")
    with torch.device("meta"):
        model = build_student(StudentConfig.from_preset("lite_student", pretrained=False))
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["model"] == "lite_student" and info["size"] == [512, 512] and info["gflops"] > 1
    assert "flop_counter" in info["counted"]


def test_conv_preset_flops_scale_with_the_pixels(capsys):
    # lite_student is convolutional: doubling H and W gives ~4x the FLOPs (the decoder's query
    # self-attention is the only part that does not grow with the image)
    small = info_json(capsys, "lite_student", "--size", "512x512")["gflops"]
    big = info_json(capsys, "lite_student", "--size", "1024x1024")["gflops"]
    assert 3.8 < big / small < 4.05
    wide = info_json(capsys, "lite_student", "--size", "512x1024")["gflops"]
    assert 1.9 < wide / small < 2.02


def test_info_of_a_checkpoint_round_trips(tmp_path, capsys):
    from castseg.models import build_student, save_checkpoint

    model = build_student("tiny")
    save_checkpoint(tmp_path / "ckpt", model, model.config.to_dict(), ["nucleus"], step=7)
    info = info_json(capsys, str(tmp_path / "ckpt"), "--size", "128x192")
    assert info["kind"] == "checkpoint" and info["class_names"] == ["nucleus"] and info["step"] == 7
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["gflops"] == info_json(capsys, "tiny", "--size", "128x192")["gflops"]  # same architecture
    assert cli.main(["info", str(tmp_path / "ckpt" / "model.safetensors"), "--size", "128x192"]) == 0
    out = capsys.readouterr().out
    assert "1.55M params" in out and "GFLOPs for one 128x192 image" in out and "step 7" in out


def test_paper_teacher_size_is_the_papers():
    from castseg.models.sizes import describe_model

    info = describe_model("teacher-gdino-sam2-paper", flops=False)
    assert abs(info["params"] - 568e6) / 568e6 < 0.03  # paper: 568M (Grounding DINO Swin-L + SAM2.1-L)
    assert [c["params"] for c in info["components"]][0] > 330e6  # Swin-L detector: 342M
    base = describe_model("teacher-gdino-sam2-base", flops=False)["params"]
    assert 440e6 < base < 460e6  # grounding-dino-base 233M + SAM2.1-L 217M


def test_teacher_flops_are_counted_part_by_part():
    # the same code path as the paper teacher, on the tiny test configs
    from castseg.models.grounded_sam import fit_size
    from castseg.models.sizes import grounded_sam_cost
    from castseg.models.tiny_teacher import TINY_DETECTOR, TINY_SEGMENTER

    info = grounded_sam_cost(TINY_DETECTOR, TINY_SEGMENTER, (96, 192), detector_size=(64, 96), boxes=4)
    parts = info["components"]
    assert [p["part"] for p in parts] == ["detector (Grounding DINO)", "SAM2 image encoder",
                                          "SAM2 prompt encoder + mask decoder"]
    assert all(p["gflops"] > 0 for p in parts) and info["gflops"] == sum(p["gflops"] for p in parts)
    h, w = fit_size(96, 192, (64, 96))
    assert parts[0]["input"].startswith(f"1x3x{h}x{w} image") and "4 box prompts" in info["counted"]
    more = grounded_sam_cost(TINY_DETECTOR, TINY_SEGMENTER, (96, 192), detector_size=(64, 96), boxes=8)
    assert more["components"][2]["gflops"] > parts[2]["gflops"] and more["components"][1] == parts[1]


def test_unknown_model_is_one_line_listing_the_names(capsys):
    assert cli.main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("castseg info: error: unknown model 'no-such-model'")
    assert all(n in err[0] for n in ("tiny", "small", "lite_student", "teacher-gdino-sam2-paper"))
