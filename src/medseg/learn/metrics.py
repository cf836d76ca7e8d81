"""Segmentation metrics as plain functions: count true/false positives and false negatives once, reduce many ways.

Counts are an integer array whose last axis holds ``tp, fp, fn`` (the columns :data:`TP`, :data:`FP`,
:data:`FN`), one row per image: ``(N, 3)`` from :func:`confusion_counts`, ``(T, N, 3)`` from
:func:`sweep_counts` (one block per threshold). :func:`dice_per_image` and :func:`iou_per_image` work on
either, so the competition score at every threshold is ``dice_per_image(sweep).mean(axis=-1)``.

The competition score (Kaggle Ultrasound Nerve Segmentation) is the mean over images of the Dice
coefficient, where an image whose truth and prediction are both empty scores 1 and an empty truth with
any predicted pixel scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_THRESHOLD",
    "FN",
    "FP",
    "TP",
    "competition_score",
    "confusion_counts",
    "confusion_counts_torch",
    "dice_nonempty",
    "dice_per_image",
    "iou_per_image",
    "presence",
    "summary",
    "sweep_counts",
]

TP, FP, FN = 0, 1, 2

DEFAULT_THRESHOLD = 0.5  # the untuned probability threshold (a logit of 0), of validation scores and untuned masks


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Count true positives, false positives and false negatives of each image.

    Args:
        pred: Predicted masks; any non-zero value is foreground.
        truth: True masks; any non-zero value is foreground.

    Returns:
        The counts, columns ``tp, fp, fn``.

    Shape:
        - pred: (N, ...), e.g. (N, H, W) or (N, 1, H, W).
        - truth: same as ``pred``.
        - output: (N, 3), int64.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim < 2:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must have the same shape (N, H, W)")
    pred = pred.reshape(len(pred), -1).astype(bool, copy=False)
    truth = truth.reshape(len(truth), -1).astype(bool, copy=False)
    tp = np.count_nonzero(pred & truth, axis=1)
    fp = np.count_nonzero(pred, axis=1) - tp
    fn = np.count_nonzero(truth, axis=1) - tp
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def confusion_counts_torch(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`confusion_counts`, computed where the tensors are (e.g. in a validation step).

    Args:
        pred: Predicted masks; any non-zero value is foreground.
        truth: True masks; any non-zero value is foreground.

    Returns:
        The counts, columns ``tp, fp, fn``, on the device of ``pred``.

    Shape:
        - pred: (N, ...), e.g. (N, 1, H, W).
        - truth: same as ``pred``.
        - output: (N, 3), int64.
    """
    if pred.shape != truth.shape or pred.dim() < 2:
        raise ValueError(f"pred {tuple(pred.shape)} and truth {tuple(truth.shape)} must have the same shape (N, H, W)")
    pred = pred.reshape(pred.shape[0], -1) != 0
    truth = truth.reshape(truth.shape[0], -1).to(pred.device) != 0
    tp = (pred & truth).sum(1)
    fp = pred.sum(1) - tp
    fn = truth.sum(1) - tp
    return torch.stack([tp, fp, fn], dim=1).long()


def dice_per_image(counts: np.ndarray) -> np.ndarray:
    """Dice coefficient ``2tp / (2tp + fp + fn)`` of each image; 1.0 where truth and prediction are both empty.

    Shape:
        - counts: (..., 3).
        - output: (...), float64.
    """
    tp, fp, fn = _columns(counts)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou_per_image(counts: np.ndarray) -> np.ndarray:
    """Intersection over union ``tp / (tp + fp + fn)`` of each image; 1.0 where both are empty.

    Shape:
        - counts: (..., 3).
        - output: (...), float64.
    """
    tp, fp, fn = _columns(counts)
    return _ratio(tp, tp + fp + fn)


def competition_score(counts: np.ndarray) -> float:
    """The Kaggle Ultrasound Nerve Segmentation score: mean over images of :func:`dice_per_image`.

    Returns:
        The score; nan if there are no images.

    Shape:
        - counts: (N, 3).
    """
    return _mean(dice_per_image(_per_image(counts)))


def dice_nonempty(counts: np.ndarray) -> float:
    """Mean Dice over the images whose truth is non-empty (how well present structures are outlined).

    Returns:
        The mean; nan if no truth is non-empty.

    Shape:
        - counts: (N, 3).
    """
    counts = _per_image(counts)
    return _mean(dice_per_image(counts[_truth_nonempty(counts)]))


def presence(counts: np.ndarray) -> dict[str, float | int]:
    """How well "the mask is non-empty" is predicted, image by image.

    Returns:
        ``n_images``; ``accuracy``, ``precision`` and ``recall`` of a non-empty prediction against a
        non-empty truth (nan where the denominator is 0); ``empty_false_positives``, the number of images
        with an empty truth and a non-empty prediction (each scores 0), and ``empty_false_positive_share``,
        that number over the images with an empty truth (nan if none); ``missed``, the number of
        non-empty truths predicted empty.

    Shape:
        - counts: (N, 3).
    """
    counts = _per_image(counts)
    truth = _truth_nonempty(counts)
    pred = counts[:, TP] + counts[:, FP] > 0
    hits = int(np.count_nonzero(pred & truth))
    false_positives = int(np.count_nonzero(pred & ~truth))
    return {
        "n_images": len(counts),
        "accuracy": _mean(pred == truth),
        "precision": _safe_div(hits, int(np.count_nonzero(pred))),
        "recall": _safe_div(hits, int(np.count_nonzero(truth))),
        "empty_false_positives": false_positives,
        "empty_false_positive_share": _safe_div(false_positives, int(np.count_nonzero(~truth))),
        "missed": int(np.count_nonzero(truth & ~pred)),
    }


def summary(counts: np.ndarray) -> dict[str, Any]:
    """All metrics of a set of images in one flat dictionary of JSON-ready numbers.

    Returns:
        ``n_images``, ``n_empty_truth``, ``score`` (:func:`competition_score`), ``iou`` (mean of
        :func:`iou_per_image`), ``dice_nonempty``, ``dice_pooled`` (Dice of all pixels pooled) and the
        :func:`presence` numbers prefixed ``presence_``. Undefined values (e.g. ``dice_nonempty`` without
        a non-empty truth) are None rather than nan, so the result is valid JSON.

    Shape:
        - counts: (N, 3).
    """
    counts = _per_image(counts)
    totals = counts.sum(axis=0)
    values: dict[str, Any] = {
        "n_images": len(counts),
        "n_empty_truth": int(np.count_nonzero(~_truth_nonempty(counts))),
        "score": competition_score(counts),
        "iou": _mean(iou_per_image(counts)),
        "dice_nonempty": dice_nonempty(counts),
        "dice_pooled": float(dice_per_image(totals)),
    }
    presence_values = presence(counts)
    del presence_values["n_images"]
    values.update({f"presence_{key}": value for key, value in presence_values.items()})
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in values.items()}


def sweep_counts(probs: Sequence[np.ndarray], truths: Sequence[np.ndarray], thresholds: np.ndarray) -> np.ndarray:
    """Counts of every image at every threshold at once, for tuning the probability threshold.

    A pixel is predicted foreground at threshold ``t`` when ``prob >= t`` (compared in float64, which
    holds float16/32/64 probabilities and thresholds exactly). The result equals
    ``confusion_counts(prob >= t, truth)`` exactly for every threshold, including probabilities equal to
    a threshold, but costs one ``searchsorted`` and two ``bincount`` per image rather than one pass per
    threshold: each pixel falls in the bucket "number of thresholds <= prob", the positive and negative
    pixels are histogrammed separately, and reverse cumulative sums give tp and fp at every threshold.

    Args:
        probs: Probability maps, one per image; images may differ in size.
        truths: True masks matching ``probs`` one to one; any non-zero value is foreground.
        thresholds: Thresholds in any order; the output follows their order.

    Returns:
        The counts, columns ``tp, fp, fn``.

    Shape:
        - probs: N arrays of any shape, e.g. (H, W).
        - truths: N arrays, each the shape of its probability map.
        - thresholds: (T,).
        - output: (T, N, 3), int64.

    Raises:
        ValueError: On mismatched lengths or shapes, thresholds that are not 1-D, or a NaN probability.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or np.isnan(thresholds).any():
        raise ValueError(f"thresholds must be a 1-D array of numbers (got shape {thresholds.shape})")
    if len(probs) != len(truths):
        raise ValueError(f"{len(probs)} probability maps but {len(truths)} masks")
    order = np.argsort(thresholds, kind="stable")
    ordered = thresholds[order]
    out = np.empty((len(thresholds), len(probs), 3), dtype=np.int64)
    for index, (prob, truth) in enumerate(zip(probs, truths)):
        out[order, index] = _sweep_one(np.asarray(prob), np.asarray(truth), ordered, index)
    return out


def _sweep_one(prob: np.ndarray, truth: np.ndarray, ordered: np.ndarray, index: int) -> np.ndarray:
    """(T, 3) counts of one image at the ascending thresholds ``ordered``."""
    if prob.shape != truth.shape:
        raise ValueError(f"image {index}: probabilities {prob.shape} and mask {truth.shape} differ in shape")
    prob = prob.reshape(-1).astype(np.float64, copy=False)
    if np.isnan(prob).any():
        raise ValueError(f"image {index}: probability map contains NaN")
    truth = truth.reshape(-1).astype(bool, copy=False)
    bucket = np.searchsorted(ordered, prob, side="right")
    n_buckets = len(ordered) + 1
    positives = np.bincount(bucket[truth], minlength=n_buckets)
    negatives = np.bincount(bucket[~truth], minlength=n_buckets)
    tp = np.cumsum(positives[::-1])[::-1][1:]
    fp = np.cumsum(negatives[::-1])[::-1][1:]
    return np.stack([tp, fp, positives.sum() - tp], axis=1)


def _columns(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.asarray(counts)
    if counts.shape[-1:] != (3,):
        raise ValueError(f"counts must have tp, fp, fn on the last axis (got shape {counts.shape})")
    counts = counts.astype(np.int64, copy=False)
    return counts[..., TP], counts[..., FP], counts[..., FN]


def _per_image(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != 3:
        raise ValueError(f"counts must have shape (N, 3) with columns tp, fp, fn (got {counts.shape})")
    return counts.astype(np.int64, copy=False)


def _truth_nonempty(counts: np.ndarray) -> np.ndarray:
    return counts[:, TP] + counts[:, FN] > 0


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, and 1.0 where the denominator is 0 (both masks empty)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.ones_like(denominator), where=denominator > 0)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if np.size(values) else math.nan


def _safe_div(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan
