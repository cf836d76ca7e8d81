"""The one path of held-out predictions: every labelled frame predicted by a model that did not train on it.

On the run's own training data each frame is predicted by its fold's model, the one that validated on it
(out-of-fold); on other labelled data every frame is predicted by the ensemble of all fold models. Frames
the run left out of training (``train --exclude``, ``run.json``'s ``excluded``) are in no fold: no model
trained on them, so when asked for (``medseg evaluate`` by default) they are predicted by the ensemble of
every fold too; ``tune`` and ``report`` leave them out, their labels being the ones in doubt.
``medseg tune``, ``medseg evaluate`` and ``medseg report`` all consume :func:`held_out_frames`; the frames
of one fold are read, predicted and handed on one fold at a time. On the run's own data each group's predictions
are made once and kept in the run folder (:mod:`medseg.infer.kept`): the first stage that needs them predicts and
keeps them, the others read them back. Every held-out prediction, kept or not, is the quantised one
(:func:`medseg.infer.kept.quantised`), so that a score never depends on whether it was read or predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from medseg.data import splits
from medseg.data.datasets import Dataset, Record
from medseg.data.samples import Sample, load_samples
from medseg.devices import device_for
from medseg.infer.kept import kept_predictions, quantised
from medseg.infer.predict import Prediction, load_fold_model, predict_frames
from medseg.runs import LEFT_OUT_GROUP, FoldDir, Run

ENSEMBLE = None  # the group key of frames that every fold model predicts together


@dataclass(frozen=True)
class HeldOutFrame:
    """One labelled frame with its held-out prediction.

    Attributes:
        id: Sample id.
        fold: The fold whose model predicted it, or ``None`` for the ensemble of every fold.
        image: The frame, ``uint8`` (``float32`` in [0, 1] for deeper frames).
        truth: Its true mask of each structure, ``bool``.
        prediction: Probabilities at the frame's size, and presence, of each structure.

    Shape:
        image: (H, W). truth: (C, H, W).
    """

    id: str
    fold: int | None
    image: np.ndarray
    truth: np.ndarray
    prediction: Prediction


def oof_groups(run: Run, ids: list[str]) -> dict[int, list[str]]:
    """The validation ids of each fold of a run: each frame is scored by the model that did not train on it.

    Raises:
        SplitError: If the run's split does not hold exactly ``ids``.
    """
    split = splits.load_split(run.split_file, expected_ids=ids)
    return {fold.fold: split.train_val(fold.fold)[1] for fold in run.folds}


def held_out_groups(run: Run, records: list[Record], out_of_fold: bool, left_out: bool = False) -> dict[int | None, list[str]]:
    """The ids each model (or the ensemble, key ``None``) predicts.

    Args:
        run: The trained run.
        records: The labelled records.
        out_of_fold: Whether ``records`` are the run's own training data (each frame goes to its fold's model).
        left_out: With ``out_of_fold``, also the frames the run left out of training, for the ensemble; else
            they are skipped.
    """
    ids = [record.id for record in records]
    if not out_of_fold:
        return {ENSEMBLE: ids}
    excluded = [i for i in ids if i in run.plan.excluded]
    groups: dict[int | None, list[str]] = dict(oof_groups(run, [i for i in ids if i not in run.plan.excluded]))
    if left_out and excluded:
        groups[ENSEMBLE] = excluded
    return groups


def held_out_frames(
    run: Run,
    dataset: Dataset,
    out_of_fold: bool,
    tta: str,
    on_message: Callable[[str], None] = print,
    left_out: bool = False,
    samples: Mapping[str, Sample] | None = None,
) -> Iterator[HeldOutFrame]:
    """Every record predicted by a model that did not train on it, one fold's frames at a time.

    Args:
        run: The trained run.
        dataset: Labelled data (its ``train`` records, read with its options): the run's own training data
            when ``out_of_fold``.
        out_of_fold: Predict each frame with its own fold's model (the run's own data), else with the
            ensemble of every fold.
        tta: Test-time augmentation (see :func:`medseg.infer.predict.predict_frames`).
        on_message: Receives one line per group of frames.
        left_out: With ``out_of_fold``, also the frames the run left out of training, predicted by the ensemble
            of every fold (no model trained on them); else they are skipped.
        samples: Frames and masks already decoded (``train`` hands its own to ``tune`` and ``report``), by id; the
            frames of a group it does not hold in full are read from ``dataset``.

    Yields:
        One :class:`HeldOutFrame` per record (but the left-out ones without ``left_out``), grouped by fold.

    Raises:
        SplitError: If ``out_of_fold`` and the run's split does not hold exactly the records it did not leave out.
        DataError: If a frame or mask cannot be read.
    """
    by_id = {record.id: record for record in dataset.train}
    for group, ids in held_out_groups(run, dataset.train, out_of_fold, left_out).items():
        chosen = [f for f in run.folds if group is ENSEMBLE or f.fold == group]
        decoded = (
            samples if samples is not None and all(i in samples for i in ids) else load_samples([by_id[i] for i in ids], dataset.options)
        )
        frames = [decoded[i][0] for i in ids]
        predictions = _group_predictions(run, group, chosen, ids, frames, out_of_fold, tta, on_message)
        for sample_id, prediction in zip(ids, predictions, strict=True):
            image, mask = decoded[sample_id]
            yield HeldOutFrame(sample_id, group, image, (mask if mask.ndim == 3 else mask[None]).astype(bool), prediction)


def _group_predictions(
    run: Run,
    group: int | None,
    folds: list[FoldDir],
    ids: list[str],
    frames: list[np.ndarray],
    out_of_fold: bool,
    tta: str,
    on_message: Callable[[str], None],
) -> Iterator[Prediction]:
    """The predictions of one group of frames: kept ones on the run's own data (made and kept when missing or
    stale), fresh ones on other data."""

    def predict() -> Iterator[Prediction]:
        device = device_for(run.config)
        return predict_frames([load_fold_model(run, fold, device) for fold in folds], frames, run.config, tta)

    if out_of_fold:
        name = LEFT_OUT_GROUP if group is ENSEMBLE else f"fold_{group}"
        return kept_predictions(run, name, folds, ids, frames, tta, predict, on_message)
    on_message(f"predicting {len(ids)} frames with {len(folds)} fold model(s)")
    return (quantised(prediction, sample_id) for sample_id, prediction in zip(ids, predict(), strict=True))
