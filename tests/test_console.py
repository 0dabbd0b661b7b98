"""castseg as a library logs nowhere of its own (a NullHandler); the CLI shows its messages on stderr.

In fresh interpreters: this suite's conftest installs the CLI's handler for the in-process tests.
"""

import json
import logging
import os
import subprocess
import sys

STATE = """
import json, logging
lg = logging.getLogger("castseg")
print(json.dumps({"handlers": [type(h).__name__ for h in lg.handlers], "propagate": lg.propagate,
                  "level": lg.level}))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CASTSEG_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_import_adds_only_a_null_handler_and_records_propagate():
    # the modules a library user imports, the CLI's included: none attaches a handler
    proc = _python("import castseg, castseg.cli, castseg.console, castseg.demo, castseg.data.split\n"
                   "import logging\n"
                   "logging.getLogger('castseg.data.split').info('nobody asked')\n"
                   "logging.getLogger('castseg.data.split').warning('a warning')\n" + STATE)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"handlers": ["NullHandler"], "propagate": True, "level": logging.NOTSET}
    # without the program's logging set-up nothing shows, warnings included: the NullHandler keeps
    # Python's last-resort handler (which prints warnings on stderr) out of it
    assert proc.stderr == ""


def test_records_reach_the_programs_own_logging_set_up():
    proc = _python("import logging, sys\n"
                   "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s|%(message)s')\n"
                   "import castseg\n"
                   "logging.getLogger('castseg.stages').info('hello')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "castseg.stages|hello\n" and proc.stderr == ""


def test_the_cli_prints_messages_on_stderr_and_leaves_the_logger_as_it_found_it(tmp_path):
    proc = _python("import sys\n"
                   "from castseg import cli\n"
                   "from castseg.demo import embedded_default\n"
                   "rc = cli.main(['split', str(embedded_default()), '--out-dir', sys.argv[1], '--labeled-fraction', '0.5'])\n"
                   "assert rc == 0, rc\n" + STATE, str(tmp_path / "splits"))
    assert proc.returncode == 0, proc.stderr
    # split's summary is a message (INFO): on stderr, through the CLI's handler
    assert proc.stderr.startswith("split ") and "labeled" in proc.stderr
    assert json.loads(proc.stdout) == {"handlers": ["NullHandler"], "propagate": True, "level": logging.NOTSET}
    assert (tmp_path / "splits" / "split.json").is_file()


def test_install_shows_messages_on_stderr_once_and_uninstall_undoes_it():
    proc = _python("import logging\n"
                   "from castseg import console\n"
                   "assert console.install() is True and console.install() is False\n"
                   "logging.getLogger('castseg.x').info('shown')\n"
                   "logging.getLogger('castseg.x').warning('careful')\n"
                   "console.uninstall()\n"
                   "logging.getLogger('castseg.x').info('not shown')\n" + STATE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "shown\nwarning: careful\n"
    # install set INFO (the logger had no level); uninstall leaves the level to its caller
    assert json.loads(proc.stdout) == {"handlers": ["NullHandler"], "propagate": True, "level": logging.INFO}
