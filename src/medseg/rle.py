"""The README's Python API name of :mod:`medseg.data.rle` (its home is the data stage's folder)."""

import sys

from medseg.data import rle as _module

sys.modules[__name__] = _module
