"""The README's Python API name of :mod:`medseg.data.io` (its home is the data stage's folder)."""

import sys

from medseg.data import io as _module

sys.modules[__name__] = _module
