"""Gray-level intensity: how a frame's pixel values become the network's input.

Training, tuning, prediction and export all normalise with the same constants (the ImageNet gray mean and
standard deviation); the ONNX export writes them into its JSON.
"""

from __future__ import annotations

import torch

GRAY_MEAN = 0.449
GRAY_STD = 0.226


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Gray frames (``uint8``, or float in [0, 1] from the batch augmentation) to the network's input."""
    scaled = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (scaled - GRAY_MEAN) / GRAY_STD
