"""Gray-level intensity: how a frame's stored values become the network's input.

Frames stored with 8 bits are used as stored (``uint8``). Deeper frames (16-bit PNG and TIFF, DICOM with
more than 8 bits stored, a rescale slope or a window, floating point TIFF) keep their precision: each is
mapped through an intensity window to ``float32`` in [0, 1] when it is read, and only normalisation turns
it into the network's input. ``data.intensity_window`` chooses the window:

- ``auto`` (the default): the window stored in a DICOM file when it has one, else the frame's 0.5th to
  99.5th percentile; 8-bit frames as stored;
- ``percentile``: every frame (8-bit ones too) from its 0.5th to its 99.5th percentile;
- ``none``: deeper frames scaled by the full range of their type (0..65535 for 16 bits), 8-bit as stored;
- ``[low, high]``: fixed values, for every frame.

Training, tuning, prediction, export and the inspector all read frames through :func:`to_frame`, and all
normalise with the same constants (the ImageNet gray mean and standard deviation); the ONNX export writes
the window and the constants into its JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

GRAY_MEAN = 0.449
GRAY_STD = 0.226
PERCENTILES = (0.5, 99.5)

WindowMode = Literal["auto", "percentile", "none"]
IntensityWindow = WindowMode | tuple[float, float]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Gray frames (``uint8``, or float in [0, 1] from a window or the batch augmentation) to the network's input."""
    scaled = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (scaled - GRAY_MEAN) / GRAY_STD


def to_frame(
    values: np.ndarray, window: IntensityWindow = "auto", stored_window: tuple[float, float] | None = None, inverted: bool = False
) -> np.ndarray:
    """A gray frame from stored values: ``uint8`` as stored for 8-bit data, else windowed to ``float32`` in [0, 1].

    Args:
        values: The stored gray values (after a DICOM modality rescale).
        window: ``auto``, ``percentile``, ``none`` or fixed ``(low, high)`` values (see the module's text).
        stored_window: The window a DICOM file carries (low, high), if any.
        inverted: MONOCHROME1: the lowest value is white; the frame is inverted after the window.

    Returns:
        The frame.

    Raises:
        ValueError: If ``values`` are not of a gray pixel type, or a fixed window is empty.

    Shape:
        values: (H, W). Returns: (H, W).
    """
    if values.dtype == np.bool_:
        values = values.astype(np.uint8) * 255
    if values.dtype == np.uint8 and not isinstance(window, tuple) and window != "percentile" and stored_window is None:
        return 255 - values if inverted else values
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"unsupported pixel type {values.dtype}; save the image as 8- or 16-bit gray")
    low, high = window_of(values, window, stored_window)
    frame = np.clip((np.nan_to_num(values.astype(np.float32), nan=low) - low) / np.float32(high - low), 0.0, 1.0)
    return np.ascontiguousarray(1.0 - frame if inverted else frame, dtype=np.float32)


def window_of(values: np.ndarray, window: IntensityWindow, stored_window: tuple[float, float] | None = None) -> tuple[float, float]:
    """The ``(low, high)`` values a frame's window maps to 0 and 1 (``high > low``).

    Raises:
        ValueError: If a fixed window is not two finite numbers, or has ``high <= low``.
    """
    if isinstance(window, tuple):
        low, high = (float(value) for value in window)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"intensity window [{low:g}, {high:g}] is not two finite numbers; give [low, high], e.g. [0, 2000]")
        if high <= low:
            raise ValueError(f"intensity window [{low:g}, {high:g}] is empty; give [low, high] with high above low")
        return low, high
    if window == "auto" and stored_window is not None:
        return stored_window
    if window == "none":
        low, high = type_range(values)
    else:
        finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
        low, high = (float(value) for value in np.percentile(finite, PERCENTILES)) if finite.size else (0.0, 1.0)
    return (low, high) if high > low else (low, low + 1.0)


def type_range(values: np.ndarray) -> tuple[float, float]:
    """The range of a pixel type: 0..65535 for ``uint16``, 0..1 for floats within it (else their min..max)."""
    if np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(values.dtype)
        return float(info.min), float(info.max)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return (0.0, 1.0) if low >= 0.0 and high <= 1.0 else (low, high)


def common_type(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Frames of one type to batch together: as they are when all are ``uint8``, else all ``float32`` in [0, 1]."""
    if all(frame.dtype == np.uint8 for frame in frames):
        return list(frames)
    return [as_unit_float(frame) for frame in frames]


def as_eight_bit(frame: np.ndarray) -> np.ndarray:
    """A frame as ``uint8``: as stored, or a frame in [0, 1] rounded to 256 steps (a windowed deeper frame)."""
    return frame if frame.dtype == np.uint8 else np.rint(np.clip(frame, 0, 1) * 255).astype(np.uint8)


def as_unit_float(frame: np.ndarray) -> np.ndarray:
    """A frame as ``float32`` in [0, 1] (``uint8`` divided by 255)."""
    return frame.astype(np.float32) / np.float32(255.0) if frame.dtype == np.uint8 else frame.astype(np.float32, copy=False)


def describe(window: IntensityWindow) -> str:
    """The window in words, for logs, the export's JSON and the report."""
    if isinstance(window, tuple):
        return f"fixed [{window[0]:g}, {window[1]:g}] to [0, 1]"
    return {
        "auto": "8-bit frames as stored; deeper ones by the DICOM file's window, else their 0.5th-99.5th percentile, to [0, 1]",
        "percentile": "every frame from its 0.5th to 99.5th percentile to [0, 1]",
        "none": "8-bit frames as stored; deeper ones by their type's full range to [0, 1]",
    }[window]
