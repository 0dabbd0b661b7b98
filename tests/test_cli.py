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


# ---------------------------------------------------------------- messages: logging, --quiet, --verbose, progress

def _split(out, fraction, *flags):
    from castseg.demo import embedded_default

    return cli.main([*flags, "split", str(embedded_default()), "--out-dir", str(out), "--labeled-fraction", fraction])


def test_quiet_run_prints_only_warnings(tmp_path, capsys):
    out = tmp_path / "splits"
    assert _split(out, "0.5") == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("split ") and "labeled" in cap.err  # the summary is a message
    assert _split(out, "0.5", "--quiet") == 0
    assert capsys.readouterr() == ("", "")
    # all labeled: the earlier unlabeled files are stale, which is a warning; -q may follow the verb too
    from castseg.demo import embedded_default

    assert cli.main(["split", str(embedded_default()), "--out-dir", str(out), "--labeled-fraction", "1.0", "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err and all(ln.startswith("warning: ") and "is from an earlier run" in ln for ln in err)


def test_verbose_adds_debug_lines_and_the_level_is_restored(tmp_path, capsys):
    import logging

    assert _split(tmp_path / "splits", "0.5", "--verbose") == 0
    first, second = capsys.readouterr().err.splitlines()[:2]
    assert first.startswith("castseg ") and ": split {" in first and second.startswith("split ")
    assert logging.getLogger("castseg").level == logging.INFO  # in-process callers keep their level
    for argv in (["-q", "-v", "info"], ["-q", "info", "--verbose"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
    assert "not allowed with" in capsys.readouterr().err


def test_progress_off_a_terminal_is_plain_lines(capsys, monkeypatch):
    from castseg.console import Progress, track

    monkeypatch.delenv("CASTSEG_NO_PROGRESS", raising=False)
    assert list(track(range(20), "items", unit="it", every=5, min_interval=0)) == list(range(20))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [ln.split(",")[0] for ln in err.splitlines()] == [f"[items] {n}/20 it" for n in (5, 10, 15, 20)]
    with Progress(20, "quick") as bar:  # a short loop (under min_interval, 5 s) writes nothing
        bar.update(20)
    assert capsys.readouterr().err == ""


def test_quiet_means_no_bar_even_on_a_terminal(monkeypatch, capsys):
    import logging

    from castseg.console import Progress, progress_enabled

    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("CASTSEG_NO_PROGRESS", raising=False)
    assert progress_enabled(Tty())
    root = logging.getLogger("castseg")
    root.setLevel(logging.WARNING)  # what --quiet sets (setLevel: the loggers cache isEnabledFor)
    try:
        assert not progress_enabled(Tty())
        with Progress(4, "quiet", every=1, min_interval=0) as bar:
            bar.update(4)
    finally:
        root.setLevel(logging.INFO)
    assert capsys.readouterr().err == ""


def test_convert_progress_in_a_pipe_has_no_carriage_return(tiny_mask_folders, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CASTSEG_PROGRESS_SECONDS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("CASTSEG_NO_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-m", "castseg", "convert", "mask-folders", str(tiny_mask_folders),
                           "--out", str(tmp_path / "a.json"), "--workers", "2"],
                          capture_output=True, env=env, timeout=300)  # bytes: text mode would turn \r into \n
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"\r" not in proc.stderr and proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    assert [ln.split(",")[0] for ln in lines[:-1]] == [f"[mask-folders] {n}/3 img" for n in (1, 2, 3)]
    assert lines[-1].startswith("mask-folders ") and "3 images, 9 annotations" in lines[-1]
