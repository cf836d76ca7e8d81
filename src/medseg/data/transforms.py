"""Resizing and augmentation of frames and masks for the network, and resizing predictions back.

This module is the CPU backend: Albumentations pipelines that work on one sample at a time
(in DataLoader workers). The training pipeline is the recipe of DESIGN.md, in this order, each step
left out when its probability is 0::

    Resize -> ElasticTransform -> GaussianBlur -> HorizontalFlip -> RandomBrightnessContrast -> CoarseDropout

Geometric steps move image and mask together, the mask with nearest-neighbour interpolation; pixel
steps (blur, brightness/contrast, dropout) change the image only. Data keeps its type (``uint8``, or
``float32`` in [0, 1] for windowed deeper frames): normalisation and tensors are the engine's job. A GPU
batch backend reads the same :class:`~medseg.config.AugmentConfig`.

Albumentations' update check (a request to PyPI on every import) is switched off unless the
environment already sets ``NO_ALBUMENTATIONS_UPDATE``: runs must not depend on the network.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np

from medseg.config import AugmentConfig, Config, InputConfig


def train_transform(config: Config, seed: int | None = None) -> A.Compose:
    """The recipe's training pipeline: resize, then the augmentations whose probability is above 0.

    Args:
        config: Run configuration; reads ``input`` and ``augment``.
        seed: Start of the pipeline's random stream, for reproducible augmentation; ``None`` for a
            fresh one. DataLoader workers must each call :func:`reseed` with their own seed.

    Returns:
        The pipeline; call it through :func:`apply`.
    """
    steps = [_resize(config.input), *_augmentations(config.augment)]
    return _compose(steps, seed)


def eval_transform(config: Config) -> A.Compose:
    """The validation and inference pipeline: resize only, deterministic.

    Args:
        config: Run configuration; reads ``input``.

    Returns:
        The pipeline; call it through :func:`apply`.
    """
    return _compose([_resize(config.input)], seed=None)


def apply(transform: A.Compose, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Run a pipeline on one gray frame and, optionally, its mask.

    Args:
        transform: A pipeline from :func:`train_transform` or :func:`eval_transform`.
        image: Gray frame of any size.
        mask: Foreground, ``bool`` or ``{0, 1}``, of the frame's size; with several structures one channel
            each, all moved with the frame by the same geometry.

    Returns:
        The transformed image and the transformed ``{0, 1}`` mask (``None`` without a mask).

    Raises:
        ValueError: If the image is not 2-D ``uint8`` or ``float32`` or the mask does not match it.

    Shape:
        - image: (H, W), ``uint8``, or ``float32`` in [0, 1] (a windowed deeper frame; it stays ``float32``).
        - mask: (H, W), or (C, H, W).
        - Returns: (height, width) of ``config.input``, and the mask in its layout at that size, ``uint8``.
    """
    _check_inputs(image, mask)
    if mask is None:
        return transform(image=image)["image"], None
    if mask.ndim == 2:
        out = transform(image=image, mask=(mask != 0).astype(np.uint8))
        return out["image"], out["mask"]
    out = transform(image=image, mask=np.ascontiguousarray(np.moveaxis(mask != 0, 0, -1), dtype=np.uint8))
    return out["image"], np.ascontiguousarray(np.moveaxis(out["mask"], -1, 0))


def reseed(transform: A.Compose, seed: int | None) -> None:
    """Restart every step of a pipeline on one shared random stream.

    Albumentations 2.0.8's ``Compose(seed=...)`` gives each step its own generator started from the same
    seed, so steps draw identical numbers and their random choices move in lockstep (a seeded flip
    fires exactly when a seeded elastic warp of equal probability does). One shared stream keeps them
    independent and still reproducible. DataLoader workers inherit copies of one state and must be
    reseeded each with their own seed (e.g. from ``torch.initial_seed()`` in ``worker_init_fn``).

    Args:
        transform: The pipeline, changed in place.
        seed: Start of the stream; ``None`` for a fresh one.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def resize_back(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a probability map from the network's size to the original frame's, linearly.

    Args:
        probs: Probabilities in [0, 1].
        size: The original ``(H, W)``.

    Returns:
        The resized probabilities, ``float32``, still in [0, 1].

    Shape:
        - probs: (h, w).
        - Returns: (H, W).
    """
    height, width = size
    resized = cv2.resize(np.asarray(probs, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def _compose(steps: list[A.BasicTransform], seed: int | None) -> A.Compose:
    transform = A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST, seed=seed)
    reseed(transform, seed)
    return transform


def _resize(size: InputConfig) -> A.Resize:
    """Linear interpolation when enlarging, area when shrinking; nearest for the mask."""
    return A.Resize(
        size.height, size.width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, area_for_downscale="image"
    )


def _augmentations(augment: AugmentConfig) -> list[A.BasicTransform]:
    """The recipe's augmentations in order, without those whose probability is 0."""
    elastic, blur, contrast, dropout = augment.elastic, augment.blur, augment.brightness_contrast, augment.coarse_dropout
    steps = [
        _elastic(elastic.alpha, elastic.sigma, elastic.p),
        A.GaussianBlur(sigma_limit=(blur.sigma_min, blur.sigma_max), p=blur.p),
        A.HorizontalFlip(p=augment.hflip.p),
        A.RandomBrightnessContrast(brightness_limit=contrast.brightness, contrast_limit=contrast.contrast, p=contrast.p),
        _coarse_dropout(dropout.max_holes, dropout.max_size, dropout.p),
    ]
    return [step for step in steps if step.p > 0]


def _elastic(alpha: float, sigma: float, p: float) -> A.ElasticTransform:
    """Elastic warp with zeros (image and mask) where it pulls in pixels from outside the frame."""
    return A.ElasticTransform(
        alpha=alpha,
        sigma=sigma,
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=p,
    )


def _coarse_dropout(max_holes: int, max_size: float, p: float) -> A.CoarseDropout:
    """1 to ``max_holes`` black rectangles, each side a quarter to all of ``max_size`` of the frame's; mask untouched."""
    sides = (max_size / 4, max_size)
    return A.CoarseDropout(num_holes_range=(1, max_holes), hole_height_range=sides, hole_width_range=sides, fill=0, fill_mask=None, p=p)


def _check_inputs(image: np.ndarray, mask: np.ndarray | None) -> None:
    if image.ndim != 2 or image.dtype not in (np.uint8, np.float32):
        raise ValueError(
            f"expected a 2-D uint8 or float32 gray image, got shape {image.shape} and dtype {image.dtype}; "
            "read it with medseg.io.read_image"
        )
    if mask is not None and (mask.ndim not in (2, 3) or mask.shape[-2:] != image.shape):
        raise ValueError(f"mask of shape {mask.shape} does not match its image of shape {image.shape}")
