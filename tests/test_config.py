"""Config system: YAML → typed sections, dotted overrides, unknown keys named, resolved round trip."""

from __future__ import annotations

import pytest

from castseg.config import LossConfig, RunConfig, TrainConfig, load_config, parse_scalar, save_resolved, with_values
from castseg.errors import InputError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_scalars_parse_as_yaml_with_exponent_floats():
    assert parse_scalar("1e-4") == pytest.approx(1e-4) and isinstance(parse_scalar("1e-4"), float)
    assert parse_scalar("3E5") == 3e5
    assert parse_scalar("true") is True and parse_scalar("null") is None
    assert parse_scalar("[1,2]") == [1, 2]
    assert parse_scalar("x.json") == "x.json" and parse_scalar("200") == 200


def test_file_and_overrides_map_onto_typed_sections(tmp_path):
    cfg_file = write(tmp_path / "c.yaml", """
model: {preset: tiny, num_classes: 2}
train:
  lr: 3e-4          # PyYAML alone would read this as a string
  max_steps: 50
data: {labeled: lab.json}
loss: {lambda_pxl: 0.1, sampler: fused}
""")
    cfg = load_config(cfg_file, ["train.lr=1e-4", "model.num_queries=200", "data.labeled=x.json",
                                 "data.crop_size=[256,256]", "train.amp=bf16", "train.save_best=true",
                                 "loss.temperature=0.07"])
    t = cfg.train
    assert isinstance(cfg, RunConfig) and isinstance(t, TrainConfig)
    assert t.lr == pytest.approx(1e-4) and t.max_steps == 50 and t.amp == "bf16" and t.save_best is True
    assert t.weight_decay == 0.05 and t.schedule == "poly"          # defaults filled in
    assert cfg.data.labeled == "x.json" and cfg.data.crop_size == (256, 256)
    m = cfg.model
    assert m.num_queries == 200 and m.num_classes == 2 and m.hidden_dim == 64  # tiny preset resolved
    # the loss section owns its defaults: the given keys, the rest as LossConfig says
    assert cfg.loss == LossConfig(lambda_pxl=0.1, sampler="fused", temperature=0.07)
    assert cfg.loss.num_negatives == 200 and cfg.loss.score_threshold == 0.3


def test_ints_become_floats_where_floats_are_expected(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "train: {lr: 1, grad_clip: 0}\n"))
    assert isinstance(cfg.train.lr, float) and cfg.train.grad_clip == 0.0 and isinstance(cfg.train.grad_clip, float)


@pytest.mark.parametrize("text, words", [
    ("trian: {lr: 1.0}\n", ["unknown top-level key 'trian'", "train"]),
    ("train: {lrr: 1.0}\n", ["train.lrr", "valid keys of train", "lr"]),
    ("model: {preset: tiny, num_querys: 5}\n", ["model.num_querys"]),
    ("train: {lr: fast}\n", ["train.lr", "expected float", "'fast'"]),
    ("train: {amp: fp32}\n", ["train.amp", "'bf16'"]),
    ("train: {max_steps: 0}\n", ["train.max_steps must be > 0"]),
    ("train: {betas: [0.9]}\n", ["train.betas", "expected 2 values"]),
    ("data: {invert: 2}\n", ["data.invert must be in [0, 1]"]),
    ("train: [1, 2]\n", ["train", "mapping"]),
    ("loss: {lambda_pix: 0.1}\n", ["loss.lambda_pix", "lambda_pxl"]),
    ("loss: {sampler: random}\n", ["loss.sampler", "'fused'"]),
    ("teacher: {type: sam3}\n", ["teacher.type", "'ensemble'", "'sam3'"]),
    ("teacher: {type: checkpoint}\n", ["teacher.path", "required"]),
    ("distill: {train: {max_stepz: 5}}\n", ["distill.train.max_stepz"]),
    ("distill: {train: {max_steps: 0}}\n", ["distill.train.max_steps must be > 0"]),
    ("- a\n- b\n", ["mapping of sections"]),
    ("train: {lr: [1\n", ["not valid YAML", "line"]),
])
def test_bad_files_name_the_key_and_the_file(tmp_path, text, words):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(InputError) as e:
        load_config(path)
    msg = str(e.value)
    assert "bad.yaml" in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", ["override 'train.lrr=1'", "unknown key train.lrr"]),
    ("nope.x=1", ["unknown section 'nope'"]),
    ("train.lr=abc", ["override 'train.lr=abc'", "expected float"]),
    ("train.lr", ["expected KEY=VALUE"]),
    ("model.preset=huge", ["unknown preset 'huge'"]),
])
def test_bad_overrides_are_named(override, words):
    with pytest.raises(InputError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_extends_merges_bases_and_detects_cycles(tmp_path):
    write(tmp_path / "base.yaml", "train: {lr: 0.001, max_steps: 10}\nloss: {lambda_semi: 0.5, temperature: 0.2}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {max_steps: 20}\nloss: {temperature: 0.3}\n")
    cfg = load_config(child)
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 20
    assert cfg.loss.lambda_semi == 0.5 and cfg.loss.temperature == 0.3
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(InputError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    # An unknown key in a base is reported against the base file.
    write(tmp_path / "badbase.yaml", "trian: {}\n")
    with pytest.raises(InputError, match="badbase.yaml"):
        load_config(write(tmp_path / "c2.yaml", "extends: badbase.yaml\n"))


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "train.lr=2e-4", "data.crop_size=[64,64]", "pseudo_labels.tta=[h,v]",
                             "teacher.type=ensemble", "teacher.members=[{type: checkpoint, path: a}]"])
    path = save_resolved(cfg, tmp_path / "run" / "config.yaml")
    assert path.read_text().startswith("# resolved castseg config")
    assert load_config(path) == cfg


def test_stage_overrides_on_top_of_the_train_section():
    cfg = load_config(None, ["train.lr=1e-3", "distill.train.max_steps=7", "refine.train.lr=5e-5"])
    t = cfg.stage_train("distill")
    assert t.lr == 1e-3 and t.max_steps == 7
    assert cfg.stage_train("refine").lr == 5e-5 and cfg.stage_train("refine").max_steps == 1000
    # the baseline takes stage 3's budget unless it has its own
    assert cfg.stage_train("supervised").lr == 5e-5
    assert load_config(None, ["supervised.train.max_steps=9"]).stage_train("supervised").max_steps == 9


def test_with_values_sets_dotted_keys_and_checks_them():
    cfg = with_values(load_config(None), {"data.labeled": "l.json", "teacher": {"type": "checkpoint", "path": "t"}})
    assert cfg.data.labeled == "l.json" and cfg.teacher.path == "t" and cfg.teacher.type == "checkpoint"
    with pytest.raises(InputError, match="castseg demo.*train.lr: expected float"):
        with_values(cfg, {"train.lr": "fast"}, "castseg demo")


def test_val_max_size_prefers_the_eval_section():
    assert load_config(None, ["data.val_max_size=512"]).val_max_size == 512
    assert load_config(None, ["data.val_max_size=512", "eval.max_size=256"]).val_max_size == 256
