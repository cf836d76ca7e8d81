"""The pure functions of ``medseg tune`` on hand-made counts whose scores are known by hand.

Counts are tp/fp/fn per threshold and frame, shape (T, N, 3); a frame's Dice is ``2tp / (2tp + fp + fn)``,
1.0 where truth and prediction are both empty. Nothing here predicts: tuning only re-reads counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.infer.predict import PostProcess, default_postprocess
from medseg.infer.tune import OofPredictions, best_point, cross_fitted_counts, frame_counts, grids, score_at, score_cube, score_grid
from medseg.learn import metrics

NAN = math.nan


def two_frames() -> np.ndarray:
    """Two frames at thresholds (0.4, 0.6): frame 0 holds a 10 px structure, frame 1 none.

    Frame 0: at 0.4 tp 8, fp 2, fn 2 (predicted area 10, Dice 0.8); at 0.6 tp 5, fp 0, fn 5 (area 5, Dice 2/3).
    Frame 1: at 0.4 a 3 px false blob (Dice 0); at 0.6 nothing (Dice 1).
    """
    return np.array(
        [
            [[8, 2, 2], [0, 3, 0]],  # threshold 0.4
            [[5, 0, 5], [0, 0, 0]],  # threshold 0.6
        ],
        dtype=np.int64,
    )


def test_score_grid_is_the_mean_dice_of_every_threshold_and_minimum_area():
    scores = score_grid(two_frames(), np.array([0, 4, 10]))
    assert scores.shape == (2, 3)
    expected = [
        [(0.8 + 0.0) / 2, (0.8 + 1.0) / 2, (0.8 + 1.0) / 2],  # 0.4: the 3 px blob goes at area 4; 10 px is not below 10
        [(2 / 3 + 1.0) / 2, (2 / 3 + 1.0) / 2, (0.0 + 1.0) / 2],  # 0.6: the 5 px mask goes at area 10
    ]
    np.testing.assert_allclose(scores, expected)


def test_an_emptied_mask_turns_its_true_positives_into_false_negatives():
    """What ``_emptied`` does, seen through the score: an emptied 5 px mask of a 10 px structure scores 0, not 1."""
    counts = np.array([[[5, 0, 5]]])  # one threshold, one frame: half the structure found, nothing false
    np.testing.assert_allclose(score_grid(counts, np.array([0, 5, 6])), [[2 / 3, 2 / 3, 0.0]])
    oof = OofPredictions(["f"], counts, np.array([NAN]))
    assert frame_counts(oof, PostProcess(0.5, 6), np.array([0.5])).tolist() == [[0, 0, 10]]
    assert frame_counts(oof, PostProcess(0.5, 5), np.array([0.5])).tolist() == [[5, 0, 5]]  # area 5 is not below 5


def test_the_minimum_area_applies_to_the_predicted_area_not_the_true_one():
    counts = np.array([[[0, 40, 0], [40, 0, 1000]]])  # a 40 px false blob; a 40 px hit of a 1040 px structure
    scores = score_grid(counts, np.array([0, 41]))
    # area 0: Dice 0 and 80 / 1080; area 41 empties both predictions: Dice 1 and 0 (all 1040 px missed)
    np.testing.assert_allclose(scores, [[(0.0 + 80 / 1080) / 2, (1.0 + 0.0) / 2]])


def test_presence_empties_frames_at_or_below_its_threshold_and_zero_or_nan_empties_none():
    counts = two_frames()
    areas = np.array([0])
    presence = np.array([0.7, 0.3])
    np.testing.assert_allclose(score_grid(counts, areas, presence, 0.5), [[(0.8 + 1.0) / 2], [(2 / 3 + 1.0) / 2]])
    np.testing.assert_allclose(score_grid(counts, areas, presence, 0.7), [[(0.0 + 1.0) / 2], [(0.0 + 1.0) / 2]])  # 0.7 is not above 0.7
    np.testing.assert_allclose(score_grid(counts, areas, presence, 0.0), score_grid(counts, areas))  # 0: off
    np.testing.assert_allclose(score_grid(counts, areas, None, 0.9), score_grid(counts, areas))  # no presence at all
    np.testing.assert_allclose(score_grid(counts, areas, np.array([NAN, NAN]), 0.9), score_grid(counts, areas))  # no head


def test_score_cube_stacks_one_grid_per_presence_threshold():
    oof = OofPredictions(["a", "b"], two_frames(), np.array([0.7, 0.3]))
    areas, presence = np.array([0, 4]), np.array([0.0, 0.5, 1.0])
    cube = score_cube(oof, areas, presence)
    assert cube.shape == (3, 2, 2)
    for depth, value in enumerate(presence):
        np.testing.assert_allclose(cube[depth], score_grid(oof.counts, areas, oof.presence, value))
    np.testing.assert_allclose(cube[2], [[0.5, 0.5], [0.5, 0.5]])  # presence 1 empties both: Dice 0 and 1


def test_frame_counts_picks_the_threshold_row_then_empties_by_area_and_presence():
    thresholds = np.array([0.4, 0.6])
    oof = OofPredictions(["a", "b"], two_frames(), np.array([0.7, 0.3]))
    assert frame_counts(oof, PostProcess(0.4), thresholds).tolist() == [[8, 2, 2], [0, 3, 0]]
    assert frame_counts(oof, PostProcess(0.6), thresholds).tolist() == [[5, 0, 5], [0, 0, 0]]
    assert frame_counts(oof, PostProcess(0.4, 4), thresholds).tolist() == [[8, 2, 2], [0, 0, 0]]
    assert frame_counts(oof, PostProcess(0.6, 10), thresholds).tolist() == [[0, 0, 10], [0, 0, 0]]
    assert frame_counts(oof, PostProcess(0.4, 0, 0.8), thresholds).tolist() == [[0, 0, 10], [0, 0, 0]]
    assert frame_counts(oof, PostProcess(0.2 + 0.4), thresholds).tolist() == [[5, 0, 5], [0, 0, 0]]  # 0.6000000000000001 is 0.6


def test_frame_counts_agree_with_the_grid_they_were_scored_in():
    thresholds, areas, presence = np.array([0.4, 0.6]), np.array([0, 4, 10]), np.array([0.0, 0.5])
    oof = OofPredictions(["a", "b"], two_frames(), np.array([0.7, 0.3]))
    cube = score_cube(oof, areas, presence)
    for depth, row, column in np.ndindex(cube.shape):
        post = PostProcess(float(thresholds[row]), int(areas[column]), float(presence[depth]))
        assert metrics.competition_score(frame_counts(oof, post, thresholds)) == pytest.approx(cube[depth, row, column])


def test_best_point_takes_the_highest_score_wherever_it_is():
    thresholds, areas = np.array([0.1, 0.5, 0.9]), np.array([0, 100])
    scores = np.full((3, 2), 0.5)
    scores[0, 1] = 0.6  # far from 0.5 and the larger area, but the best
    assert best_point(scores, thresholds, areas) == PostProcess(0.1, 100, 0.0, tuned=True)


def test_best_point_ties_go_to_the_threshold_nearest_half_then_the_smallest_area_then_presence_nearest_half():
    thresholds, areas, presence = np.array([0.2, 0.45, 0.7, 0.9]), np.array([300, 0, 50]), np.array([0.0, 0.3, 0.55, 0.9])
    cube = np.zeros((4, 4, 3))
    cube[:, [0, 2], :] = 0.8  # thresholds 0.2 and 0.7 tie everywhere; 0.45, the nearest 0.5, scores less
    cube[:, 2, 1] = 0.8 - 1e-13  # within 1e-12 of the best: still a tie, and area 0 is the smallest
    chosen = best_point(cube, thresholds, areas, presence)
    assert chosen == PostProcess(0.7, 0, 0.55, tuned=True)  # 0.7 is nearer 0.5 than 0.2; presence 0.55 nearest 0.5
    cube[:, 2, 1] = 0.8 - 1e-9  # no longer a tie: 0.7 with area 50 beats 0.2 with area 0, the threshold rule comes first
    assert best_point(cube, thresholds, areas, presence) == PostProcess(0.7, 50, 0.55, tuned=True)


def test_best_point_of_a_two_dimensional_grid_has_no_presence_decision():
    thresholds, areas = np.array([0.3, 0.5]), np.array([0, 200])
    chosen = best_point(np.ones((2, 2)), thresholds, areas)
    assert chosen == PostProcess(0.5, 0, 0.0, tuned=True) and chosen.tuned
    assert not chosen.absent(0.01)


def test_grids_add_the_untuned_setting_sorted_and_once():
    thresholds, areas, presence = grids(True, np.array([0.7, 0.3]), np.array([100, 50]), np.array([0.9]))
    assert thresholds.tolist() == [0.3, 0.5, 0.7] and areas.tolist() == [0, 50, 100] and presence.tolist() == [0.5, 0.9]
    assert areas.dtype.kind == "i"
    thresholds, areas, presence = grids(True, np.array([0.5, 0.3]), np.array([0, 100]), np.array([0.5, 0.0]))
    assert thresholds.tolist() == [0.3, 0.5] and areas.tolist() == [0, 100] and presence.tolist() == [0.0, 0.5]
    untuned = default_postprocess(True)
    assert untuned.threshold in thresholds and untuned.min_area in areas and untuned.presence_threshold in presence


def test_grids_without_a_presence_head_search_no_presence_threshold():
    thresholds, areas, presence = grids(False, np.array([0.3]), np.array([100]), np.array([0.5, 0.9]))
    assert thresholds.tolist() == [0.3, 0.5] and areas.tolist() == [0, 100] and presence.tolist() == [0.0]
    assert default_postprocess(False).presence_threshold in presence


def test_score_at_reads_one_setting_of_the_cube():
    thresholds, areas, presence = np.array([0.3, 0.5, 0.7]), np.array([0, 100]), np.array([0.0, 0.5])
    cube = np.arange(12, dtype=float).reshape(2, 3, 2)
    assert score_at(cube, PostProcess(0.7, 100, 0.5), thresholds, areas, presence) == 11.0
    assert score_at(cube, default_postprocess(True), thresholds, areas, presence) == cube[1, 1, 0] == 8.0
    assert score_at(cube, default_postprocess(False), thresholds, areas, presence) == cube[0, 1, 0] == 2.0
    assert score_at(cube, PostProcess(0.1 + 0.2, 0, 0.0), thresholds, areas, presence) == 0.0  # 0.30000000000000004 is 0.3


def test_cross_fitted_counts_score_each_fold_with_the_threshold_the_other_fold_chose():
    """Fold 0's frame is best at 0.3, fold 1's at 0.6: each is scored at the other one's best."""
    thresholds = np.array([0.3, 0.6])
    counts = np.array(
        [
            [[10, 0, 0], [5, 5, 0]],  # 0.3: a is whole (Dice 1), b has 5 false pixels (2/3)
            [[5, 0, 5], [10, 0, 0]],  # 0.6: a is half found (2/3), b is whole (1)
        ]
    )
    oof = OofPredictions(["a", "b"], counts, np.array([NAN, NAN]))
    result = cross_fitted_counts(oof, {"a": 0, "b": 1}, thresholds, np.array([0]), np.zeros(1))
    assert result.dtype == np.int64 and result.tolist() == [[5, 0, 5], [5, 5, 0]]


def test_cross_fitted_counts_choose_the_minimum_area_without_the_fold_and_keep_the_frame_order():
    """Fold 0 (a, b) is best with minimum area 100, fold 1 (c, d) without: each gets the other's, rows in id order."""
    counts = np.array(
        [
            [
                [0, 50, 0],  # a (fold 0): a 50 px false blob on an empty frame: Dice 0, or 1 at area 100
                [60, 10, 20],  # c (fold 1): 60 of an 80 px structure in a 70 px mask: Dice 0.8 at area 0, 0 at area 100
                [180, 20, 20],  # b (fold 0): Dice 0.9 at both areas
                [0, 0, 0],  # d (fold 1): empty and predicted empty: Dice 1
            ]
        ]
    )
    oof = OofPredictions(["a", "c", "b", "d"], counts, np.full(4, NAN))
    fold_of = {"a": 0, "b": 0, "c": 1, "d": 1}
    result = cross_fitted_counts(oof, fold_of, np.array([0.5]), np.array([0, 100]), np.zeros(1))
    assert result.tolist() == [[0, 50, 0], [0, 0, 80], [180, 20, 20], [0, 0, 0]]
    honest = metrics.competition_score(result)
    tuned_on_all = score_grid(counts, np.array([0, 100])).max()
    assert honest == pytest.approx(np.mean([0.0, 0.0, 0.9, 1.0])) and tuned_on_all == pytest.approx(np.mean([1.0, 0.0, 0.9, 1.0]))


def test_cross_fitted_counts_choose_the_presence_threshold_without_the_fold():
    """Fold 0 needs presence 0.5 to drop a false blob; fold 1's structure has presence 0.4 and needs it off."""
    counts = np.array([[[0, 30, 0], [100, 0, 0], [100, 0, 0], [0, 0, 0]]])  # e, f (fold 0), g, h (fold 1)
    oof = OofPredictions(["e", "f", "g", "h"], counts, np.array([0.2, 0.9, 0.4, 0.1]))
    fold_of = {"e": 0, "f": 0, "g": 1, "h": 1}
    result = cross_fitted_counts(oof, fold_of, np.array([0.5]), np.array([0]), np.array([0.0, 0.5]))
    assert result.tolist() == [[0, 30, 0], [100, 0, 0], [0, 0, 100], [0, 0, 0]]
