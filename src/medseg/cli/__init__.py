"""The ``medseg`` command line: thin commands that call the stages.

One module per stage's commands (:mod:`~medseg.cli.data_commands`, :mod:`~medseg.cli.learn_commands`,
:mod:`~medseg.cli.infer_commands`, :mod:`~medseg.cli.report_commands`), the options they share
(:mod:`~medseg.cli.options`), what they print (:mod:`~medseg.cli.printers`), the exit codes
(:mod:`~medseg.cli.exits`) and the program that registers them and turns errors into exit codes
(:mod:`~medseg.cli.program`). Exit codes: 0 success, 1 problems found or a data error, 2 a usage error.
A user mistake is one line on stderr, never a traceback.
"""

from medseg.cli.exits import EXIT_PROBLEMS, EXIT_USAGE, os_error_line
from medseg.cli.options import DataFlags, data_options, with_data_flags
from medseg.cli.printers import inspection_json, print_evaluation, print_inspection
from medseg.cli.program import app, entry, main, show_click_error

__all__ = [
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "DataFlags",
    "app",
    "data_options",
    "entry",
    "inspection_json",
    "main",
    "os_error_line",
    "print_evaluation",
    "print_inspection",
    "show_click_error",
    "with_data_flags",
]
