"""``medseg tune``: the probability threshold and minimum mask area that maximise the competition score
on the run's validation frames (out-of-fold when the run has several folds).

Each validation frame is predicted by the model that did not train on it, at its original size. One pass
per frame counts tp/fp/fn at every threshold (:func:`medseg.metrics.sweep_counts`); the minimum area is
then applied to those counts without predicting again (a mask below it becomes empty: its tp and fp
become fn), so the whole grid costs one prediction per frame.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg import metrics, runs
from medseg.datasets import load_dataset
from medseg.engine import load_samples
from medseg.errors import UsageError
from medseg.predict import POSTPROCESS_FILE, Run, device_for, load_fold_model, oof_groups, open_run, predict_probs
from medseg.train import data_options

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)
MIN_AREAS = np.array([0, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000, 5000])


def oof_counts(run: Run, thresholds: np.ndarray, tta: str, on_message: Callable[[str], None] = print) -> tuple[list[str], np.ndarray]:
    """Counts of every validation frame at every threshold, each frame predicted by its own fold's model.

    Args:
        run: The trained run.
        thresholds: Probability thresholds.
        tta: Test-time augmentation (see :func:`medseg.predict.predict_probs`).
        on_message: Receives one line per fold.

    Returns:
        The frame ids and their counts.

    Shape:
        Returns: (N,) ids and (T, N, 3) counts.
    """
    dataset = load_dataset(run.data, data_options(run.config))
    groups = oof_groups(run, [record.id for record in dataset.train])
    by_id = {record.id: record for record in dataset.train}
    device = device_for(run.config)
    ids, counts = [], []
    for fold in run.folds:
        val_ids = groups[fold.fold]
        on_message(f"fold {fold.fold}: predicting {len(val_ids)} validation frames")
        samples = load_samples([by_id[i] for i in val_ids], data_options(run.config))
        frames = [samples[i][0] for i in val_ids]
        truths = [samples[i][1].astype(bool) for i in val_ids]
        probs = predict_probs([load_fold_model(run, fold, device)], frames, run.config, tta)
        counts.append(np.concatenate([metrics.sweep_counts([p], [t], thresholds) for p, t in zip(probs, truths)], axis=1))
        ids += val_ids
    return ids, np.concatenate(counts, axis=1)


def score_grid(counts: np.ndarray, min_areas: np.ndarray) -> np.ndarray:
    """Competition score for every threshold and minimum area, from counts at every threshold.

    Args:
        counts: tp/fp/fn per threshold and frame.
        min_areas: Minimum predicted areas in pixels; a smaller mask becomes empty.

    Returns:
        The mean per-frame Dice.

    Shape:
        counts: (T, N, 3). Returns: (T, A).
    """
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    area = tp + fp
    scores = np.empty((counts.shape[0], len(min_areas)))
    for column, min_area in enumerate(min_areas):
        emptied = area < min_area
        filtered = np.stack([np.where(emptied, 0, tp), np.where(emptied, 0, fp), np.where(emptied, fn + tp, fn)], axis=-1)
        scores[:, column] = metrics.dice_per_image(filtered).mean(axis=-1)
    return scores


def best_point(scores: np.ndarray, thresholds: np.ndarray, min_areas: np.ndarray) -> tuple[float, int]:
    """The threshold and minimum area of the highest score; ties go to the threshold nearest 0.5, then the smallest area."""
    best = scores.max()
    candidates = np.argwhere(scores >= best - 1e-12)
    row, column = min(candidates, key=lambda rc: (abs(thresholds[rc[0]] - 0.5), min_areas[rc[1]]))
    return float(thresholds[row]), int(min_areas[column])


def score_before(counts: np.ndarray, thresholds: np.ndarray) -> float:
    """The score of the untuned defaults: threshold 0.5 and no minimum area (``nan`` if 0.5 was not swept)."""
    at_half = np.flatnonzero(np.isclose(thresholds, 0.5))
    return float(score_grid(counts[at_half[:1]], np.array([0]))[0, 0]) if at_half.size else float("nan")


def tune_run(
    path: Path,
    tta: str = "hflip",
    thresholds: np.ndarray = THRESHOLDS,
    min_areas: np.ndarray = MIN_AREAS,
    on_message: Callable[[str], None] = print,
    force: bool = False,
) -> dict:
    """Tune a run's post-processing and write ``RUN/postprocess.json``.

    Args:
        path: The run folder.
        tta: Test-time augmentation used for the validation predictions (use the same when predicting).
        thresholds: Probability thresholds to try.
        min_areas: Minimum mask areas (original pixels) to try.
        on_message: Receives progress lines.
        force: Replace an earlier tuning.

    Returns:
        What was written: the chosen values, the score before (0.5, no minimum area) and after, the grid.
    """
    run = open_run(path)
    if (run.path / POSTPROCESS_FILE).is_file() and not force:
        raise UsageError(f"{run.path / POSTPROCESS_FILE}: the run is tuned already; use --force to tune it again")
    ids, counts = oof_counts(run, thresholds, tta, on_message)
    scores = score_grid(counts, min_areas)
    threshold, min_area = best_point(scores, thresholds, min_areas)
    before = score_before(counts, thresholds)
    result = {
        "threshold": threshold,
        "min_area": min_area,
        "score_before": float(before),
        "score_after": float(scores.max()),
        "frames": len(ids),
        "out_of_fold": len(run.folds) > 1,
        "tta": tta,
        "thresholds": thresholds.tolist(),
        "min_areas": min_areas.tolist(),
        "scores": np.round(scores, 6).tolist(),
    }
    runs.write_json(run.path / POSTPROCESS_FILE, result)
    return result
