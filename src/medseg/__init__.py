"""medseg: train U-Nets that segment structures in grayscale medical images with Kaggle-style RLE masks.

The stages are modules that data flows through one way: :mod:`medseg.io` (files), :mod:`medseg.rle`
(the codec), :mod:`medseg.datasets` (layouts and records), :mod:`medseg.splits` (subject-grouped folds)
and :mod:`medseg.inspector` (the dataset inspector); :mod:`medseg.cli` is the command line over them.
"""

__version__ = "0.1.0"
