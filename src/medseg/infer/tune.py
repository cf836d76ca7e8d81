"""``medseg tune``: the probability threshold, minimum mask area and (for a model with a presence head)
presence threshold that maximise the competition score on the run's validation frames (out-of-fold when
the run has several folds).

Each validation frame is predicted by the model that did not train on it, at its original size. One pass
per frame counts tp/fp/fn at every threshold (:func:`medseg.learn.metrics.sweep_counts`) and keeps its presence
probability; the minimum area and the presence threshold are then applied to those counts without
predicting again (a mask they empty has its tp and fp turned into fn), so the whole grid costs one
prediction per frame. The untuned setting is always in the grid, so the tuned score on these frames is
never below the untuned one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data import splits
from medseg.data.datasets import load_dataset
from medseg.data.samples import Sample
from medseg.errors import UsageError
from medseg.infer.heldout import held_out_frames
from medseg.infer.predict import PostProcess, default_postprocess
from medseg.learn import metrics
from medseg.runs import Run, StructuresTuning, Tuning, open_run

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)
MIN_AREAS = np.array([0, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000, 8000, 10000, 12500, 15000])
PRESENCE_THRESHOLDS = np.round(np.arange(0.0, 1.001, 0.05), 2)


@dataclass
class OofPredictions:
    """What tuning needs of each validation frame, each predicted by its own fold's model.

    Attributes:
        ids: Frame ids.
        counts: tp/fp/fn of each frame at each threshold.
        presence: Presence probability of each frame (``nan`` without a presence head).

    Shape:
        counts: (T, N, 3). presence: (N,).
    """

    ids: list[str]
    counts: np.ndarray
    presence: np.ndarray


@dataclass(frozen=True)
class TuneRequest:
    """What ``medseg tune`` tunes, and over which grid.

    Attributes:
        run: The run folder.
        tta: Test-time augmentation of the validation predictions (use the same when predicting).
        thresholds: Probability thresholds to try.
        min_areas: Minimum mask areas (original pixels) to try.
        presence_thresholds: Presence thresholds to try (models with a presence head).
    """

    run: Path
    tta: str = "hflip"
    thresholds: np.ndarray = field(default_factory=THRESHOLDS.copy)
    min_areas: np.ndarray = field(default_factory=MIN_AREAS.copy)
    presence_thresholds: np.ndarray = field(default_factory=PRESENCE_THRESHOLDS.copy)


def oof_predictions(run: Run, thresholds: np.ndarray, tta: str, on_message: Callable[[str], None] = print) -> OofPredictions:
    """Counts at every threshold and presence of every validation frame of a one-structure run, each predicted
    by its own fold's model (:func:`oof_by_structure` for runs of several structures)."""
    return oof_by_structure(run, thresholds, tta, on_message)[0]


def oof_by_structure(
    run: Run,
    thresholds: np.ndarray,
    tta: str,
    on_message: Callable[[str], None] = print,
    samples: Mapping[str, Sample] | None = None,
) -> list[OofPredictions]:
    """:class:`OofPredictions` of every structure (one for a one-structure run), from one pass over the frames.

    Args:
        run: The trained run.
        thresholds: Probability thresholds.
        tta: Test-time augmentation (see :func:`medseg.infer.predict.predict_frames`).
        on_message: Receives one line per fold.
        samples: The run's frames and masks, already decoded (see :func:`~medseg.infer.heldout.held_out_frames`).
    """
    dataset = load_dataset(run.data, run.config.data)
    ids: list[str] = []
    counts: list[list[np.ndarray]] = [[] for _ in range(run.structures)]
    presence: list[list[float]] = [[] for _ in range(run.structures)]
    for frame in held_out_frames(run, dataset, out_of_fold=True, tta=tta, on_message=on_message, samples=samples):
        ids.append(frame.id)
        for index, (probs, truth, present) in enumerate(zip(frame.prediction.probs, frame.truth, frame.prediction.presence, strict=True)):
            counts[index].append(metrics.sweep_counts([probs], [truth], thresholds))
            presence[index].append(float(present))
    return [
        OofPredictions(ids, np.concatenate(found, axis=1), np.array(values, dtype=np.float64))
        for found, values in zip(counts, presence, strict=True)
    ]


def score_grid(
    counts: np.ndarray, min_areas: np.ndarray, presence: np.ndarray | None = None, presence_threshold: float = 0.0
) -> np.ndarray:
    """Competition score for every threshold and minimum area, from counts at every threshold.

    Args:
        counts: tp/fp/fn per threshold and frame.
        min_areas: Minimum predicted areas in pixels; a smaller mask becomes empty.
        presence: Presence probability per frame, or None.
        presence_threshold: Frames whose presence is not above it become empty (0: off).

    Returns:
        The mean per-frame Dice.

    Shape:
        counts: (T, N, 3). presence: (N,). Returns: (T, A).
    """
    absent = _absent(presence, presence_threshold, counts.shape[1])
    scores = np.empty((counts.shape[0], len(min_areas)))
    for column, min_area in enumerate(min_areas):
        scores[:, column] = metrics.dice_per_image(_emptied(counts, min_area, absent)).mean(axis=-1)
    return scores


def frame_counts(oof: OofPredictions, post: PostProcess, thresholds: np.ndarray) -> np.ndarray:
    """tp/fp/fn of each frame under one post-processing setting whose threshold is one of ``thresholds``.

    Shape:
        Returns: (N, 3).
    """
    row = int(np.flatnonzero(np.isclose(thresholds, post.threshold))[0])
    return _emptied(oof.counts[row], post.min_area, _absent(oof.presence, post.presence_threshold, len(oof.ids)))


def _absent(presence: np.ndarray | None, presence_threshold: float, n_frames: int) -> np.ndarray:
    """Which frames the presence decision empties."""
    if presence is None:
        return np.zeros(n_frames, dtype=bool)
    rule = PostProcess(presence_threshold=presence_threshold)
    return np.array([rule.absent(value) for value in presence], dtype=bool)


def _emptied(counts: np.ndarray, min_area: int, absent: np.ndarray) -> np.ndarray:
    """Counts after emptying masks below ``min_area`` pixels and the frames in ``absent`` (tp and fp become fn).

    Shape:
        counts: (..., N, 3). absent: (N,). Returns: like ``counts``.
    """
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    emptied = (tp + fp < min_area) | absent
    return np.stack([np.where(emptied, 0, tp), np.where(emptied, 0, fp), np.where(emptied, fn + tp, fn)], axis=-1)


def score_cube(oof: OofPredictions, min_areas: np.ndarray, presence_thresholds: np.ndarray) -> np.ndarray:
    """:func:`score_grid` for every presence threshold.

    Shape:
        Returns: (P, T, A).
    """
    return np.stack([score_grid(oof.counts, min_areas, oof.presence, value) for value in presence_thresholds])


def best_point(
    scores: np.ndarray, thresholds: np.ndarray, min_areas: np.ndarray, presence_thresholds: np.ndarray | None = None
) -> PostProcess:
    """The setting of the highest score; ties go to the threshold nearest 0.5, then the smallest area, then
    the presence threshold nearest 0.5.

    Shape:
        scores: (T, A), or (P, T, A) with one slice per presence threshold.
    """
    presence_thresholds = np.zeros(1) if presence_thresholds is None else presence_thresholds
    cube = scores if scores.ndim == 3 else scores[None]
    candidates = np.argwhere(cube >= cube.max() - 1e-12)
    depth, row, column = min(
        candidates, key=lambda prc: (abs(thresholds[prc[1]] - 0.5), min_areas[prc[2]], abs(presence_thresholds[prc[0]] - 0.5))
    )
    return PostProcess(float(thresholds[row]), int(min_areas[column]), float(presence_thresholds[depth]), tuned=True)


def grids(
    has_presence: bool, thresholds: np.ndarray, min_areas: np.ndarray, presence_thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grids to search, each holding the untuned value; one presence threshold (0: off) without a head."""
    untuned = default_postprocess(has_presence)
    return (
        np.union1d(np.asarray(thresholds, dtype=float), [untuned.threshold]),
        np.union1d(np.asarray(min_areas, dtype=int), [untuned.min_area]),
        np.union1d(np.asarray(presence_thresholds, dtype=float), [untuned.presence_threshold]) if has_presence else np.zeros(1),
    )


def tune_run(
    request: TuneRequest,
    *,
    force: bool = False,
    on_message: Callable[[str], None] = print,
    samples: Mapping[str, Sample] | None = None,
) -> Tuning | StructuresTuning:
    """Tune a run's post-processing (each structure's, for a run of several) and write ``RUN/postprocess.json``.

    Each structure's setting only changes the scores of its own (frame, structure) pairs, so choosing each
    one's best setting maximises their mean, the score of several structures.

    Args:
        request: The run, the TTA and the grid.
        force: Replace an earlier tuning.
        on_message: Receives progress lines.
        samples: The run's frames and masks, already decoded (``train`` hands its own), so that they are not read again.

    Returns:
        What was written: the chosen values, the score before (the untuned setting) and after, the
        (threshold x minimum area) grid at the chosen presence threshold, and the best score per presence
        threshold; for several structures one such block each, and the mean scores over (frame, structure).
    """
    run, tta = open_run(request.run), request.tta
    if run.postprocess_file.is_file() and not force:
        raise UsageError(f"{run.postprocess_file}: the run is tuned already; use --force to tune it again")
    has_presence = run.config.model.presence_head
    thresholds, min_areas, presence_thresholds = grids(has_presence, request.thresholds, request.min_areas, request.presence_thresholds)
    per_structure = oof_by_structure(run, thresholds, tta, on_message, samples)
    out_of_fold = len(run.folds) > 1
    fold_of = _fold_of(run) if out_of_fold else None
    grid = (thresholds, min_areas, presence_thresholds)
    tunings = [tune_structure(oof, has_presence, *grid, tta, out_of_fold, fold_of) for oof in per_structure]
    if not run.classes:
        result: Tuning | StructuresTuning = tunings[0]
    else:
        result = StructuresTuning(
            classes=dict(zip(run.classes, tunings, strict=True)),
            score_before=float(np.mean([tuning.score_before for tuning in tunings])),
            score_after=float(np.mean([tuning.score_after for tuning in tunings])),
            cross_fitted=float(np.mean([tuning.cross_fitted for tuning in tunings])) if fold_of else None,
            frames=len(per_structure[0].ids),
            out_of_fold=out_of_fold,
            tta=tta,
        )
    result.write(run.postprocess_file)
    return result


def tune_structure(
    oof: OofPredictions,
    has_presence: bool,
    thresholds: np.ndarray,
    min_areas: np.ndarray,
    presence_thresholds: np.ndarray,
    tta: str,
    out_of_fold: bool,
    fold_of: dict[str, int] | None = None,
) -> Tuning:
    """The best setting of one structure on its out-of-fold predictions, with the grid that chose it, and, given
    each frame's fold, the cross-fitted score (:func:`cross_fitted_counts`)."""
    cube = score_cube(oof, min_areas, presence_thresholds)
    chosen = best_point(cube, thresholds, min_areas, presence_thresholds)
    depth = int(np.flatnonzero(presence_thresholds == chosen.presence_threshold)[0])
    return Tuning(
        threshold=chosen.threshold,
        min_area=chosen.min_area,
        presence_threshold=chosen.presence_threshold,
        presence_head=has_presence,
        score_before=score_at(cube, default_postprocess(has_presence), thresholds, min_areas, presence_thresholds),
        score_after=float(cube.max()),
        cross_fitted=_cross_fitted_score(oof, fold_of, thresholds, min_areas, presence_thresholds) if fold_of else None,
        frames=len(oof.ids),
        out_of_fold=out_of_fold,
        tta=tta,
        thresholds=thresholds.tolist(),
        min_areas=min_areas.tolist(),
        scores=np.round(cube[depth], 6).tolist(),
        presence_thresholds=presence_thresholds.tolist(),
        presence_scores=np.round(cube.max(axis=(1, 2)), 6).tolist(),
    )


def score_at(cube: np.ndarray, post: PostProcess, thresholds: np.ndarray, min_areas: np.ndarray, presence_thresholds: np.ndarray) -> float:
    """The score of one setting of the grid."""
    depth = int(np.flatnonzero(np.isclose(presence_thresholds, post.presence_threshold))[0])
    row = int(np.flatnonzero(np.isclose(thresholds, post.threshold))[0])
    column = int(np.flatnonzero(min_areas == post.min_area)[0])
    return float(cube[depth, row, column])


def _cross_fitted_score(
    oof: OofPredictions, fold_of: dict[str, int], thresholds: np.ndarray, min_areas: np.ndarray, presence_thresholds: np.ndarray
) -> float:
    return float(metrics.dice_per_image(cross_fitted_counts(oof, fold_of, thresholds, min_areas, presence_thresholds)).mean())


def _fold_of(run: Run) -> dict[str, int]:
    """The validation fold of every frame of the run's split."""
    split = splits.load_split(run.split_file)
    return {sample_id: fold for fold, members in enumerate(split.folds) for sample_id in members}


def cross_fitted_counts(
    oof: OofPredictions, fold_of: dict[str, int], thresholds: np.ndarray, min_areas: np.ndarray, presence_thresholds: np.ndarray
) -> np.ndarray:
    """Counts of each frame under the setting tuned on the other folds' frames only.

    Tuning on the frames one then scores flatters the score; this scores every fold with a setting it had
    no part in choosing, an honest estimate of the tuned score on new subjects.

    Args:
        oof: Out-of-fold predictions.
        fold_of: The fold of each frame id.
        thresholds: Thresholds of ``oof.counts``.
        min_areas: Minimum areas to try.
        presence_thresholds: Presence thresholds to try.

    Shape:
        Returns: (N, 3), in the order of ``oof.ids``.
    """
    folds = np.array([fold_of[i] for i in oof.ids])
    result = np.zeros((len(oof.ids), 3), dtype=np.int64)
    for fold in np.unique(folds):
        others = _subset(oof, folds != fold)
        chosen = best_point(score_cube(others, min_areas, presence_thresholds), thresholds, min_areas, presence_thresholds)
        result[folds == fold] = frame_counts(_subset(oof, folds == fold), chosen, thresholds)
    return result


def _subset(oof: OofPredictions, keep: np.ndarray) -> OofPredictions:
    return OofPredictions([i for i, k in zip(oof.ids, keep) if k], oof.counts[:, keep], oof.presence[keep])
