"""The installed ``medseg`` console script, run as a user runs it: a real process, its exit code and output.

``CliRunner`` and ``main()`` run inside the test process; these run the script pip installed, so that an
exception raised by the command-line library itself (typer, its click) is seen as the user sees it.

Starting Python and importing ``medseg.cli`` (PyTorch among it) costs seconds a process, 40 times here: so each
run is a process forked from one that has done that import once, which then runs the script file itself with
the arguments, its own stdin, stdout and stderr, and exits with the script's exit code
(:class:`ForkedScript`); one test runs the script as a fresh process, shebang and imports included.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from medseg import __version__
from medseg.cli import app

SCRIPT = shutil.which("medseg", path=str(Path(sys.executable).parent))
COMMANDS = sorted(command.name for command in app.registered_commands)


TIMEOUT_S = 120

# Runs in a fresh interpreter: imports what the script imports, then forks once a request (a JSON line: the
# arguments and the files for stdout and stderr); the child becomes the script, the parent answers its exit code.
FORK_SERVER = r"""
import json, os, runpy, sys

script = sys.argv[1]
from medseg.cli import entry  # noqa: F401  the script's own import, done once

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY), (2, request["err"], os.O_WRONLY)):
                os.dup2(os.open(path, flags), fd)
            sys.argv = [script, *request["args"]]
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:  # what the interpreter does with sys.exit's argument
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an uncaught exception
            sys.excepthook(*sys.exc_info())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkedScript:
    """Runs the installed console script in processes forked from one interpreter that imported ``medseg.cli``.

    Each run is a process of its own that executes the script file with ``sys.argv`` set, stdin from
    ``/dev/null`` and stdout and stderr to files, so its output and exit code are the script's; what it skips is
    starting Python and importing ``medseg.cli`` again. The server sees the environment of its first run.
    """

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.server: subprocess.Popen | None = None

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """Run ``medseg ARGS``; fails the test if no exit code comes within :data:`TIMEOUT_S`."""
        if self.server is None:
            self.folder = Path(tempfile.mkdtemp(prefix="medseg-script-"))
            log = os.open(self.folder / "server.err", os.O_WRONLY | os.O_CREAT)  # the server's own errors, shown if it dies
            self.server = subprocess.Popen(
                [sys.executable, "-c", FORK_SERVER, SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )
            os.close(log)
        out, err = self.folder / "out", self.folder / "err"
        for path in (out, err):
            path.write_text("")
        self.server.stdin.write(json.dumps({"args": list(args), "out": str(out), "err": str(err)}) + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], TIMEOUT_S)
        answer = self.server.stdout.readline() if ready else ""
        assert answer, f"medseg {' '.join(args)}: no exit code (server: {(self.folder / 'server.err').read_text()[-2000:]})"
        return subprocess.CompletedProcess([SCRIPT, *args], int(answer), out.read_text(), err.read_text())

    def close(self) -> None:
        """Stop the server and remove its files."""
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=TIMEOUT_S)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.server = self.folder = None


FORKED = ForkedScript()


@pytest.fixture(scope="module", autouse=True)
def forked_script():
    """Stops the fork server of :func:`medseg` when the module's tests are done.

    Yields:
        The :class:`ForkedScript` that :func:`medseg` runs the script with.
    """
    yield FORKED
    FORKED.close()


def medseg(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script (forked from an interpreter that imported it: :class:`ForkedScript`)."""
    assert SCRIPT is not None, f"no medseg console script beside {sys.executable}; install medseg (make test does)"
    return FORKED.run(*args)


def fresh_medseg(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script as a new process, as a shell does."""
    assert SCRIPT is not None, f"no medseg console script beside {sys.executable}; install medseg (make test does)"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, check=False, timeout=TIMEOUT_S)


def assert_usage_error(result: subprocess.CompletedProcess, command: str, *words: str) -> None:
    """Exit 2, no traceback, the command's usage line and one ``error:`` line that holds ``words``."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"Usage: medseg {command}".rstrip()), output
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output
    assert all(word in errors[0] for word in words), errors[0]


def test_every_command_is_covered():
    assert COMMANDS == sorted(
        ["inspect", "train", "tune", "report", "predict", "export", "check-submission", "evaluate", "demo", "sweep", "serve"]
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = medseg(command, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.startswith(f"Usage: medseg {command}"), result.stdout


def test_help_and_version_of_the_program():
    result = fresh_medseg("--help")
    assert result.returncode == 0 and all(command in result.stdout for command in COMMANDS), result.stdout
    assert medseg("--help").stdout == result.stdout  # a forked run shows what a fresh process shows
    result = fresh_medseg("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"medseg {__version__}", result.stdout + result.stderr


def test_verbose_version_lists_every_dependency():
    from importlib import metadata

    result = medseg("--version", "--verbose")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"medseg {__version__}"
    listed = {line.split()[0] for line in lines[1:]}
    for name in ("python", "torch", "typer", "segmentation-models-pytorch", "lightning", "albumentations"):
        assert name in listed, result.stdout
    assert f"typer {metadata.version('typer')}" in result.stdout


def test_verbose_alone_is_a_usage_error():
    result = medseg("--verbose")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --verbose goes with --version: medseg --version --verbose"


def test_no_arguments_shows_the_help():
    result = medseg()
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "Usage: medseg" in result.stdout + result.stderr and "train" in result.stdout + result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_of_every_command(command):
    assert_usage_error(medseg(command, "--nosuch"), command, "No such option", "--nosuch", f"medseg {command} --help")


def test_unknown_command():
    assert_usage_error(medseg("nosuchcmd"), "", "No such command", "nosuchcmd")


@pytest.mark.parametrize(
    "command", ["inspect", "train", "tune", "report", "predict", "export", "check-submission", "evaluate", "sweep", "serve"]
)
def test_missing_argument(command):
    assert_usage_error(medseg(command), command, "Missing")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("train", "DATA", "--out", "RUN", "--folds", "abc"), "--folds"),
        (("predict", "RUN", "IMAGES", "--batch-size", "many"), "--batch-size"),
        (("export", "RUN", "--onnx", "m.onnx", "--opset", "x"), "--opset"),
        (("check-submission", "FILE", "--shape", "420"), "--shape"),
        (("inspect", "DATA", "--mask-value", "one"), "--mask-value"),
        (("serve", "RUN", "--port", "70000"), "--port"),
    ],
)
def test_wrong_value_type(args, option):
    assert_usage_error(medseg(*args), args[0], option)
