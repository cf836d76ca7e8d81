"""The README's Python API name of :mod:`medseg.data.splits` (its home is the data stage's folder)."""

import sys

from medseg.data import splits as _module

sys.modules[__name__] = _module
