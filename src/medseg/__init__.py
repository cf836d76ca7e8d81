"""medseg: train U-Nets that segment structures in grayscale medical images with Kaggle-style RLE masks.

The package has a folder per stage, and data flows through them one way: :mod:`medseg.data` (files, the RLE
codec, layouts, splits, the inspector, augmentation) -> :mod:`medseg.learn` (models, losses, metrics, the
Lightning engine) -> :mod:`medseg.infer` (ensemble prediction, the out-of-fold path, tuning, submissions,
ONNX export) -> :mod:`medseg.report` (evaluation, the HTML report) -> :mod:`medseg.cli`. Every stage reads
:mod:`medseg.config` (the typed configuration), :mod:`medseg.runs` (the run folder) and :mod:`medseg.errors`.
"""

__version__ = "0.1.0"
