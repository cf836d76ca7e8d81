"""``python -m medseg.cli``: the command line, as the ``medseg`` script runs it."""

from medseg.cli.program import entry

entry()
