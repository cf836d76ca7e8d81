"""The installed ``medseg`` console script, run as a user runs it: a real process, its exit code and output.

``CliRunner`` and ``main()`` run inside the test process; these run the script pip installed, so that an
exception raised by the command-line library itself (typer, its click) is seen as the user sees it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medseg import __version__
from medseg.cli import app

SCRIPT = shutil.which("medseg", path=str(Path(sys.executable).parent))
COMMANDS = sorted(command.name for command in app.registered_commands)


def medseg(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script."""
    assert SCRIPT is not None, f"no medseg console script beside {sys.executable}; install medseg (make test does)"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, check=False, timeout=120)


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
    assert COMMANDS == sorted(["inspect", "train", "tune", "report", "predict", "export", "check-submission", "evaluate", "demo", "sweep"])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = medseg(command, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.startswith(f"Usage: medseg {command}"), result.stdout


def test_help_and_version_of_the_program():
    result = medseg("--help")
    assert result.returncode == 0 and all(command in result.stdout for command in COMMANDS), result.stdout
    result = medseg("--version")
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


@pytest.mark.parametrize("command", ["inspect", "train", "tune", "report", "predict", "export", "check-submission", "evaluate", "sweep"])
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
    ],
)
def test_wrong_value_type(args, option):
    assert_usage_error(medseg(*args), args[0], option)
