"""``medseg evaluate``: how a run does on labelled frames, per frame and overall, after post-processing.

On a data set other than the run's own, every frame is predicted by the ensemble of the run's fold models.
On the run's own training data only held-out frames are scored, each by the model that did not see it
(out-of-fold), so that the figures are never in-sample.
"""

from __future__ import annotations

import csv
import io as text_io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg import metrics, runs
from medseg.datasets import DataOptions, load_dataset, require_clean
from medseg.engine import load_samples
from medseg.errors import UsageError
from medseg.io import atomic_write
from medseg.predict import Run, device_for, load_fold_model, oof_groups, open_run, predict_frames, read_postprocess
from medseg.train import data_options

PER_IMAGE_COLUMNS = ("id", "fold", "truth_area", "pred_area", "dice", "iou", "truth_empty", "pred_empty")


def evaluate_run(
    path: Path,
    data: Path,
    options: DataOptions | None = None,
    tta: str = "hflip",
    out: Path | None = None,
    force: bool = False,
    on_message: Callable[[str], None] = print,
) -> dict:
    """Score a run on labelled data and write ``per_image.csv`` and ``summary.json``.

    Args:
        path: The run folder.
        data: A labelled data folder (any layout).
        options: How to read it; defaults to the run's data options.
        tta: Test-time augmentation.
        out: Output folder; defaults to ``RUN/evaluation/<data folder name>``.
        force: Replace existing outputs.
        on_message: Receives progress lines.

    Returns:
        The summary (competition score, Dice on non-empty truths, IoU, presence figures, mode).

    Raises:
        UsageError: If outputs exist and ``force`` is not given.
        DataError: If the data set has problems.
    """
    run = open_run(path)
    out = Path(out) if out else run.path / "evaluation" / Path(data).resolve().name
    dataset = require_clean(load_dataset(data, options or data_options(run.config)))  # the inputs before the outputs
    if (out / "summary.json").exists() and not force:
        raise UsageError(f"{out}: an evaluation is already there; use --force to replace it or --out for another folder")
    out_of_fold = Path(data).resolve() == run.data
    groups = oof_groups(run, [r.id for r in dataset.train]) if out_of_fold else {None: [r.id for r in dataset.train]}
    samples = load_samples(dataset.train, dataset.options)
    rows, counts = score_frames(run, groups, samples, tta, on_message)
    summary = {
        "data": str(Path(data).resolve()),
        "mode": "out-of-fold (held-out frames of the run's own data)" if out_of_fold else "ensemble of all folds",
        "postprocess": vars(read_postprocess(run)),
        "tta": tta,
        **metrics.summary(counts),
    }
    _write(out, rows, summary)
    summary["out"] = str(out)
    return summary


def score_frames(run: Run, groups: dict, samples: dict, tta: str, on_message: Callable[[str], None]) -> tuple[list[dict], np.ndarray]:
    """Per-frame rows (areas, Dice, IoU, empty flags) and tp/fp/fn counts after the run's post-processing.

    Args:
        run: The trained run.
        groups: Ids to score by fold (``None``: every fold model as an ensemble).
        samples: Frames and masks by id.
        tta: Test-time augmentation.
        on_message: Receives progress lines.
    """
    post = read_postprocess(run)
    device = device_for(run.config)
    rows, counts = [], []
    for fold, ids in groups.items():
        chosen = [f for f in run.folds if fold is None or f.fold == fold]
        on_message(f"predicting {len(ids)} frames with {'fold ' + str(fold) if fold is not None else f'{len(chosen)} fold model(s)'}")
        models = [load_fold_model(run, f, device) for f in chosen]
        frames = [samples[i][0] for i in ids]
        for sample_id, prediction in zip(ids, predict_frames(models, frames, run.config, tta)):
            truth = samples[sample_id][1].astype(bool)
            count = metrics.confusion_counts(prediction.mask(post)[None], truth[None])
            counts.append(count[0])
            rows.append(_row(sample_id, fold, count))
    return rows, np.array(counts, dtype=np.int64).reshape(-1, 3)


def _row(sample_id: str, fold: int | None, count: np.ndarray) -> dict:
    tp, fp, fn = (int(v) for v in count[0])
    return {
        "id": sample_id,
        "fold": "" if fold is None else fold,
        "truth_area": tp + fn,
        "pred_area": tp + fp,
        "dice": round(float(metrics.dice_per_image(count)[0]), 6),
        "iou": round(float(metrics.iou_per_image(count)[0]), 6),
        "truth_empty": tp + fn == 0,
        "pred_empty": tp + fp == 0,
    }


def _write(out: Path, rows: list[dict], summary: dict) -> None:
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_IMAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(out / "per_image.csv") as stream:
        stream.write(buffer.getvalue())
    runs.write_json(out / "summary.json", summary)
