"""The one path of held-out predictions: every labelled frame predicted by a model that did not train on it.

On the run's own training data each frame is predicted by its fold's model, the one that validated on it
(out-of-fold); on other labelled data every frame is predicted by the ensemble of all fold models. Frames
the run left out of training (``train --exclude``, ``run.json``'s ``excluded``) are in no fold: no model
trained on them, so when asked for (``medseg evaluate`` by default) they are predicted by the ensemble of
every fold too; ``tune`` and ``report`` leave them out, their labels being the ones in doubt.
``medseg tune``, ``medseg evaluate`` and ``medseg report`` all consume :func:`held_out_frames`; the frames
of one fold are read, predicted and handed on one fold at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from medseg.data import splits
from medseg.data.datasets import Dataset, Record
from medseg.data.samples import load_samples
from medseg.devices import device_for
from medseg.infer.predict import Prediction, load_fold_model, predict_frames
from medseg.runs import SPLIT_FILE, Run

ENSEMBLE = None  # the group key of frames that every fold model predicts together


@dataclass(frozen=True)
class HeldOutFrame:
    """One labelled frame with its held-out prediction.

    Attributes:
        id: Sample id.
        fold: The fold whose model predicted it, or ``None`` for the ensemble of every fold.
        image: The frame, ``uint8``.
        truth: Its true mask, ``bool``.
        prediction: Probabilities at the frame's size, and presence.
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
    split = splits.load_split(run.path / SPLIT_FILE, expected_ids=ids)
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

    Yields:
        One :class:`HeldOutFrame` per record (but the left-out ones without ``left_out``), grouped by fold.

    Raises:
        SplitError: If ``out_of_fold`` and the run's split does not hold exactly the records it did not leave out.
        DataError: If a frame or mask cannot be read.
    """
    by_id = {record.id: record for record in dataset.train}
    device = device_for(run.config)
    for fold, ids in held_out_groups(run, dataset.train, out_of_fold, left_out).items():
        chosen = [f for f in run.folds if fold is ENSEMBLE or f.fold == fold]
        on_message(f"predicting {len(ids)} frames with {f'fold {fold}' if fold is not ENSEMBLE else f'{len(chosen)} fold model(s)'}")
        samples = load_samples([by_id[i] for i in ids], dataset.options)
        models = [load_fold_model(run, f, device) for f in chosen]
        frames = [samples[i][0] for i in ids]
        for sample_id, prediction in zip(ids, predict_frames(models, frames, run.config, tta)):
            image, mask = samples[sample_id]
            yield HeldOutFrame(sample_id, fold, image, mask.astype(bool), prediction)
