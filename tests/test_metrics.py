"""Tests for medseg.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.learn.metrics import (
    competition_score,
    confusion_counts,
    confusion_counts_torch,
    dice_nonempty,
    dice_per_image,
    iou_per_image,
    presence,
    summary,
    sweep_counts,
)


def masks(*rows: str) -> np.ndarray:
    """A (1, H, W) bool mask from rows of '.' and '#'."""
    return np.array([[char == "#" for char in row] for row in rows])[None]


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Four 2x4 images: empty/empty, empty truth with one false positive, partial overlap, missed truth."""
    empty = masks("....", "....")
    one_fp = masks("#...", "....")
    truth_partial = masks("###.", "....")
    pred_partial = masks(".###", "....")
    truth_missed = masks("..##", "..##")
    pred = np.concatenate([empty, one_fp, pred_partial, empty])
    truth = np.concatenate([empty, empty, truth_partial, truth_missed])
    return pred, truth


def test_confusion_counts_hand_case() -> None:
    pred, truth = hand_case()
    counts = confusion_counts(pred, truth)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [[0, 0, 0], [0, 1, 0], [2, 1, 1], [0, 0, 4]])


def test_dice_and_iou_hand_case() -> None:
    counts = confusion_counts(*hand_case())
    # empty/empty = 1; empty truth with a false positive = 0; overlap tp=2 fp=1 fn=1; all missed = 0.
    np.testing.assert_allclose(dice_per_image(counts), [1.0, 0.0, 4 / 6, 0.0])
    np.testing.assert_allclose(iou_per_image(counts), [1.0, 0.0, 2 / 4, 0.0])
    assert competition_score(counts) == pytest.approx((1 + 0 + 4 / 6 + 0) / 4)
    assert dice_nonempty(counts) == pytest.approx((4 / 6 + 0) / 2)


def test_dice_works_on_sweep_shaped_counts() -> None:
    counts = confusion_counts(*hand_case())
    stacked = np.stack([counts, counts[::-1]])
    np.testing.assert_allclose(dice_per_image(stacked), [[1.0, 0.0, 4 / 6, 0.0], [0.0, 4 / 6, 0.0, 1.0]])


def test_all_empty_prediction_scores_the_share_of_empty_truths() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random((20, 8, 8)) < 0.3
    truth[rng.random(20) < 0.4] = False
    empty_share = np.mean(~truth.reshape(20, -1).any(axis=1))
    assert 0 < empty_share < 1
    counts = confusion_counts(np.zeros_like(truth), truth)
    assert competition_score(counts) == pytest.approx(empty_share)
    assert dice_nonempty(counts) == 0.0


def test_dice_nonempty_is_nan_without_nonempty_truth() -> None:
    counts = np.array([[0, 0, 0], [0, 5, 0]])
    assert np.isnan(dice_nonempty(counts))
    assert competition_score(counts) == 0.5


def test_presence_hand_case() -> None:
    counts = confusion_counts(*hand_case())
    # truth non-empty: images 2, 3; prediction non-empty: images 1, 2.
    result = presence(counts)
    assert result == {
        "n_images": 4,
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "empty_false_positives": 1,
        "empty_false_positive_share": 0.5,
        "missed": 1,
    }


def test_presence_undefined_ratios_are_nan() -> None:
    result = presence(np.zeros((3, 3), dtype=np.int64))
    assert result["accuracy"] == 1.0
    assert np.isnan(result["precision"]) and np.isnan(result["recall"])
    assert result["empty_false_positive_share"] == 0.0


def test_summary_is_json_ready_and_consistent() -> None:
    counts = confusion_counts(*hand_case())
    result = summary(counts)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["score"] == pytest.approx(competition_score(counts))
    assert result["iou"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert result["dice_pooled"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 5))
    assert result["n_empty_truth"] == 2
    assert result["presence_empty_false_positives"] == 1
    all_empty = summary(np.zeros((2, 3), dtype=np.int64))
    assert all_empty["dice_nonempty"] is None and all_empty["presence_precision"] is None
    assert all_empty["score"] == 1.0
    json.dumps(all_empty, allow_nan=False)


def test_counts_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        confusion_counts(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        competition_score(np.zeros((4, 2)))


def random_case(seed: int, n: int = 6) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Probability maps of different sizes, some probabilities exactly equal to thresholds."""
    rng = np.random.default_rng(seed)
    thresholds = np.concatenate([np.linspace(0.0, 1.0, 21), rng.random(5)])
    rng.shuffle(thresholds)
    probs, truths = [], []
    for index in range(n):
        shape = (int(rng.integers(3, 40)), int(rng.integers(3, 40)))
        prob = rng.random(shape)
        on_threshold = rng.random(shape) < 0.2
        prob[on_threshold] = rng.choice(thresholds, size=int(on_threshold.sum()))
        truth = rng.random(shape) < 0.4 if index % 3 else np.zeros(shape, dtype=bool)
        probs.append(prob.astype(np.float32) if index % 2 else prob)
        truths.append(truth)
    return probs, truths, thresholds


def direct_sweep(probs: list[np.ndarray], truths: list[np.ndarray], thresholds: np.ndarray) -> np.ndarray:
    return np.stack(
        [np.concatenate([confusion_counts((p.astype(np.float64) >= t)[None], y[None]) for p, y in zip(probs, truths)]) for t in thresholds]
    )


@pytest.mark.parametrize("seed", range(4))
def test_sweep_counts_equals_direct_counts(seed: int) -> None:
    probs, truths, thresholds = random_case(seed)
    swept = sweep_counts(probs, truths, thresholds)
    assert swept.shape == (len(thresholds), len(probs), 3)
    assert swept.dtype == np.int64
    np.testing.assert_array_equal(swept, direct_sweep(probs, truths, thresholds))


def test_sweep_counts_threshold_equality_is_inclusive() -> None:
    prob = np.array([[0.25, 0.5], [0.5, 0.75]])
    truth = np.array([[True, True], [False, False]])
    swept = sweep_counts([prob], [truth], np.array([0.5, 0.25, 0.75, 1.0, 0.0]))
    np.testing.assert_array_equal(
        swept[:, 0],
        [[1, 2, 1], [2, 2, 0], [0, 1, 2], [0, 0, 2], [2, 2, 0]],
    )


@settings(max_examples=60, deadline=None)
@given(
    prob=st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.5000001, 0.7, 1.0]), min_size=1, max_size=30),
    truth_bits=st.integers(min_value=0, max_value=2**30),
    thresholds=st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]), min_size=1, max_size=8),
)
def test_sweep_counts_property(prob: list[float], truth_bits: int, thresholds: list[float]) -> None:
    prob_array = np.array(prob)
    truth = np.array([(truth_bits >> i) & 1 for i in range(len(prob))], dtype=bool)
    thresholds_array = np.array(thresholds)
    np.testing.assert_array_equal(
        sweep_counts([prob_array], [truth], thresholds_array),
        direct_sweep([prob_array], [truth], thresholds_array),
    )


def test_sweep_counts_rejects_nan_and_mismatch() -> None:
    with pytest.raises(ValueError, match="NaN"):
        sweep_counts([np.array([[np.nan]])], [np.array([[True]])], np.array([0.5]))
    with pytest.raises(ValueError, match="differ in shape"):
        sweep_counts([np.zeros((2, 2))], [np.zeros((2, 3))], np.array([0.5]))
    with pytest.raises(ValueError, match="2 probability maps but 1"):
        sweep_counts([np.zeros((2, 2))] * 2, [np.zeros((2, 2))], np.array([0.5]))


def test_torch_twin_equals_numpy() -> None:
    rng = np.random.default_rng(7)
    pred = rng.random((5, 1, 12, 9)) < 0.5
    truth = rng.random((5, 1, 12, 9)) < 0.3
    truth[1] = False
    pred[2] = False
    expected = confusion_counts(pred, truth)
    got = confusion_counts_torch(torch.from_numpy(pred), torch.from_numpy(truth).float())
    assert got.dtype == torch.int64 and got.shape == (5, 3)
    np.testing.assert_array_equal(got.numpy(), expected)
