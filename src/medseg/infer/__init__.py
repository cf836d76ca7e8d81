"""The inference stage: the fold ensemble with flip TTA, the one out-of-fold prediction path, tuning of the
post-processing, submissions and their validator, ONNX export, and the outputs of ``medseg predict``.

Nothing here imports Lightning.
"""
