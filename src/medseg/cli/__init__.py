"""The ``medseg`` command line: thin commands that call the stages.

One module per stage's commands (:mod:`~medseg.cli.data_commands`, :mod:`~medseg.cli.learn_commands`,
:mod:`~medseg.cli.infer_commands`, :mod:`~medseg.cli.report_commands`), the options they share
(:mod:`~medseg.cli.options`), what they print (:mod:`~medseg.cli.printers`), the exit codes
(:mod:`~medseg.cli.exits`) and the program that registers them and turns errors into exit codes
(:mod:`~medseg.cli.program`). Exit codes: 0 success, 1 problems found or a data error, 2 a usage error.
A user mistake is one line on stderr, never a traceback.
"""

from medseg.cli.options import DataFlags, with_data_flags
from medseg.cli.program import app, entry, main

__all__ = ["DataFlags", "app", "entry", "main", "with_data_flags"]
