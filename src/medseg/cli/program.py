"""The ``medseg`` program: the typer app with every command, and :func:`main`, which turns errors into exit codes.

A user mistake is one line on stderr, never a traceback (exit codes: :mod:`medseg.cli.exits`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Annotated

import typer
from rich.markup import escape

from medseg import __version__, progress
from medseg.cli.data_commands import check_submission_command, inspect_command
from medseg.cli.exits import EXIT_INTERRUPTED, EXIT_PROBLEMS, EXIT_USAGE, os_error_line
from medseg.cli.infer_commands import export_command, predict_command, tune_command
from medseg.cli.learn_commands import sweep_command, train_command
from medseg.cli.printers import show_warning, stderr, stdout
from medseg.cli.report_commands import demo_command, evaluate_command, report_command
from medseg.cli.serve_commands import serve_command
from medseg.errors import MedsegError, UsageError
from medseg.files import printable
from medseg.ranks import rank_prefix
from medseg.runs import installation_versions

# The exceptions typer raises for command-line mistakes come from its own copy of click (typer >= 0.29
# vendors it as ``typer._click``) or from the click package (older typer): resolve them from typer itself.
_CLICK = sys.modules[typer.BadParameter.__module__]
ClickException = _CLICK.ClickException
NoArgsIsHelp = getattr(_CLICK, "NoArgsIsHelpError", None)

# In the order ``medseg --help`` lists them: the workflow's order, then the extras.
COMMANDS = {
    "inspect": inspect_command,
    "train": train_command,
    "tune": tune_command,
    "report": report_command,
    "predict": predict_command,
    "export": export_command,
    "check-submission": check_submission_command,
    "evaluate": evaluate_command,
    "demo": demo_command,
    "sweep": sweep_command,
    "serve": serve_command,
}


def _typer_app() -> typer.Typer:
    """The typer app with every command of :data:`COMMANDS` registered."""
    program = typer.Typer(
        name="medseg",
        help="Train U-Nets on grayscale medical images with Kaggle-style RLE masks; inspect, predict, check.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    for name, command in COMMANDS.items():
        program.command(name)(command)
    return program


app = _typer_app()


@app.callback(invoke_without_command=True)
def root(
    context: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="With --version: also Python, the platform and every dependency's version.")
    ] = False,
) -> None:
    """Segment structures in grayscale medical images whose masks come as Kaggle-style RLE."""
    if version:
        stdout.print(f"medseg {__version__}")
        if verbose:
            for name, installed in installation_versions().items():
                stdout.print(f"  {name} {installed}")
        raise typer.Exit()
    if verbose:
        raise UsageError("--verbose goes with --version: medseg --version --verbose")
    if context.invoked_subcommand is None:
        stdout.print(context.get_help())
        raise typer.Exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code instead of exiting.

    Warnings are shown as one ``warning:`` line each, without the source line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    warnings.showwarning = show_warning
    arguments = sys.argv[1:] if argv is None else argv
    bars = progress.shown(stderr) if stderr.is_terminal and "--quiet" not in arguments else contextlib.nullcontext()
    try:
        with bars:
            result = app(args=argv, prog_name="medseg", standalone_mode=False)
    except typer.Exit as stop:
        return stop.exit_code
    except ClickException as error:
        return show_click_error(error, arguments)
    except typer.Abort:
        stderr.print("Aborted.")
        return EXIT_INTERRUPTED
    except UsageError as error:
        return _show_error(printable(error), EXIT_USAGE)
    except MedsegError as error:
        return _show_error(printable(error), EXIT_PROBLEMS)
    except OSError as error:
        return _show_error(printable(os_error_line(error)), EXIT_PROBLEMS)
    return result if isinstance(result, int) else 0


def _show_error(line: str, exit_code: int) -> int:
    stderr.print(f"[red]error:[/red] {escape(rank_prefix() + line)}")  # each process of a DDP run says which it is
    return exit_code


def show_click_error(error: Exception, arguments: list[str]) -> int:
    """Show a command-line mistake the parser found as the command's usage line and one ``error:`` line.

    Args:
        error: The parser's exception.
        arguments: The command line, without the program name.

    Returns:
        The exit code click gives it: 2 for a usage error.
    """
    if NoArgsIsHelp is not None and isinstance(error, NoArgsIsHelp):
        error.show()
        return error.exit_code
    context = getattr(error, "ctx", None) or _command_context(arguments)
    stderr.print(escape(context.get_usage()))
    stderr.print(f"[red]error:[/red] {escape(error.format_message())} (see '{escape(context.command_path)} --help')")
    return error.exit_code


def _command_context(arguments: list[str]) -> typer.Context:
    """A context of the command named in ``arguments`` (of the program when none is), for its usage line.

    The parser raises some mistakes (an option given too few values) without the context they happened in.
    """
    group = typer.main.get_command(app)
    context = typer.Context(group, info_name="medseg")
    name = next((argument for argument in arguments if not argument.startswith("-")), None)
    command = group.get_command(context, name) if name else None
    return typer.Context(command, info_name=name, parent=context) if command is not None else context


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
