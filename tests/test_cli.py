import pytest

from castseg import cli


def test_overrides_may_follow_options():
    args = cli.parse_args(["run", "cfg.yaml", "train.lr=1e-4", "--name", "x", "data.crop_size=[64,64]"])
    assert args.overrides == ["train.lr=1e-4", "data.crop_size=[64,64]"] and args.name == "x"


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["run", "cfg.yaml", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["eval", "--gt", "a", "--pred", "b", "x=1"])  # eval takes no overrides
