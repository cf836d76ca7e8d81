"""``python -m medseg``: the command line, as the ``medseg`` script runs it."""

from medseg.cli import entry

entry()
