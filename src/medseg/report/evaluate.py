"""``medseg evaluate``: how a run does on labelled frames, per frame and overall, after post-processing.

On a data set other than the run's own, every frame is predicted by the ensemble of the run's fold models.
On the run's own training data only held-out frames are scored, each by the model that did not see it
(out-of-fold), so that the figures are never in-sample; the frames the run left out of training
(``train --exclude``) are scored too, predicted by the ensemble of every fold (no model trained on them), unless
``skip_excluded`` (``--skip-excluded``) leaves them out. A run of several structures is scored per (frame,
structure): one row each in ``per_image.csv`` and a summary per structure beside the overall one.
"""

from __future__ import annotations

import csv
import io as text_io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg import runs
from medseg.config import DataOptions
from medseg.data import io
from medseg.data.datasets import Dataset, Record, load_dataset, require_clean
from medseg.data.samples import frame_digest
from medseg.errors import UsageError
from medseg.files import Output, atomic_write, check_outputs, spreadsheet_safe
from medseg.infer.heldout import HeldOutFrame, held_out_frames
from medseg.infer.predict import PostProcess, postprocess_record, read_postprocess
from medseg.learn import metrics
from medseg.runs import Run, foreign_entries, open_run

PER_IMAGE_FILE = "per_image.csv"
SUMMARY_FILE = "summary.json"
PER_IMAGE_COLUMNS = ("id", "fold", "truth_area", "pred_area", "dice", "iou", "truth_empty", "pred_empty")
PER_STRUCTURE_COLUMNS = ("id", "class", *PER_IMAGE_COLUMNS[1:])  # a run of several structures: one row per frame and structure


@dataclass(frozen=True)
class EvaluateRequest:
    """What ``medseg evaluate`` scores, and where it writes.

    Attributes:
        run: The run folder.
        data: A labelled data folder (any layout).
        options: How to read it; the run's data options when ``None``.
        tta: Test-time augmentation.
        out: Output folder; ``RUN/evaluation/<data folder name>`` when ``None``.
        skip_excluded: On the run's own data, leave out the frames the run left out of training.
    """

    run: Path
    data: Path
    options: DataOptions | None = None
    tta: str = "hflip"
    out: Path | None = None
    skip_excluded: bool = False


def evaluate_run(request: EvaluateRequest, *, force: bool = False, on_message: Callable[[str], None] = print) -> dict:
    """Score a run on labelled data and write ``per_image.csv`` and ``summary.json``.

    Args:
        request: The run, the data, how to read and predict it, and the output folder.
        force: Replace existing outputs.
        on_message: Receives progress lines.

    Returns:
        The summary (competition score, Dice on non-empty truths, IoU, presence figures, mode; on the run's own
        data, the frames it left out of training under ``left_out``).

    Raises:
        UsageError: If outputs exist and ``force`` is not given, or ``skip_excluded`` is given for other data.
        DataError: If the data set has problems.
    """
    path, data, options, tta, out, skip_excluded = (
        request.run, request.data, request.options, request.tta, request.out, request.skip_excluded
    )  # fmt: skip
    run = open_run(path)
    out = Path(out) if out else run.evaluation_dir(Path(data).resolve().name)
    dataset = _same_structures(require_clean(load_dataset(data, options or run.config.data)), run)  # the inputs before the outputs
    _check_out(out, force, [*run.inputs, run.path, Path(data)])
    out_of_fold = Path(data).resolve() == run.data or _copy_of_training_data(run, dataset, on_message)
    if skip_excluded and not out_of_fold:
        raise UsageError(f"--skip-excluded leaves out frames of the run's own data ({run.data}); drop it to evaluate {data}")
    posts = read_postprocess(run)
    frames = held_out_frames(run, dataset, out_of_fold, tta, on_message, left_out=not skip_excluded)
    rows, counts = score_frames(frames, posts, classes=run.classes)
    summary = {
        "data": str(Path(data).resolve()),
        "mode": _mode(run, out_of_fold, skip_excluded),
        "postprocess": postprocess_record(run, posts),
        "tta": tta,
        **scores_summary(rows, counts, run.classes),
        **({"left_out": _left_out(run, skip_excluded)} if out_of_fold and run.plan.excluded else {}),
    }
    _write(out, rows, summary, PER_STRUCTURE_COLUMNS if run.classes else PER_IMAGE_COLUMNS)
    summary["out"] = str(out)
    return summary


def _check_out(out: Path, force: bool, inputs: list[Path]) -> None:
    """Check the output folder before anything is predicted: an earlier evaluation is replaced only with ``--force``,
    and a folder of other files never (only ``per_image.csv`` and ``summary.json`` are written there).

    Raises:
        UsageError: Naming the folder and the fix.
    """
    check_outputs([Output("--out", out, folder=True)], force, inputs)
    if out.is_dir():
        foreign = foreign_entries(out, {re.escape(PER_IMAGE_FILE): None, re.escape(SUMMARY_FILE): None, r"\..+\.tmp": None})
        if foreign:
            raise UsageError(
                f"--out {out}: holds files an evaluation does not write ({', '.join(path.name for path in foreign[:3])}); "
                "choose another --out"
            )


def _copy_of_training_data(run: Run, dataset: Dataset, on_message: Callable[[str], None]) -> bool:
    """Whether DATA, at another path than the run's data, is a copy of it: the same frames by content.

    The run records a digest of every frame it trained or validated on (``frames.json``); a run written
    before that is recognised by its data folder's path only.

    Returns:
        True when every frame of DATA is the run's frame of the same id (score them out-of-fold), False when
        none is one of the run's frames.

    Raises:
        UsageError: When some frames of DATA are frames the run trained on and the rest are not its data.
    """
    trained = run.trained_frames()
    if trained is None:
        return False
    by_digest = {digest: frame for frame, digest in trained.digests.items()}
    digests = {record.id: _digest(record, dataset.options) for record in dataset.train}
    seen = {sample_id: by_digest.get(digest) for sample_id, digest in digests.items()}
    matched = {frame: own for frame, own in seen.items() if own is not None}
    if not matched:
        return False
    ids = set(seen)
    if all(frame == own for frame, own in matched.items()) and ids == set(trained.digests) | set(run.plan.excluded):
        on_message(f"{dataset.root} holds the frames {run.path} trained on (a copy of {run.data}): scoring them out-of-fold")
        return True
    frame, own = next(iter(matched.items()))
    raise UsageError(
        f"{dataset.root}: {len(matched)} of {len(ids)} frames are frames {run.path} trained or validated on (by content: {frame} is its "
        f"{own}), so they cannot be scored as held-out; evaluate the run's own data ({run.data}) for out-of-fold scores, or leave them out"
    )


def _digest(record: Record, options: DataOptions) -> str:
    """The content digest of a record's frame (:func:`~medseg.data.samples.frame_digest`)."""
    return frame_digest(io.read_image(record.image_path, options.intensity_window, max_pixels=options.max_pixels))


def scores_summary(rows: list[dict], counts: np.ndarray, classes: list[str]) -> dict:
    """The figures of scored frames (:func:`score_frames`): the overall summary and, with several structures, each one's."""
    return {**metrics.summary(counts), **(_per_structure(rows, counts, classes) if classes else {})}


def _mode(run: Run, out_of_fold: bool, skip_excluded: bool) -> str:
    """How the frames were predicted, in words."""
    if not out_of_fold:
        return "ensemble of all folds"
    mode = "out-of-fold (held-out frames of the run's own data)"
    if not run.plan.excluded:
        return mode
    if skip_excluded:
        return f"{mode}; the {len(run.plan.excluded)} frame(s) left out of training not scored"
    return f"{mode}; the {len(run.plan.excluded)} frame(s) left out of training by the ensemble of all folds"


def _left_out(run: Run, skip_excluded: bool) -> dict:
    """The frames the run left out of training, with their reasons, and whether they were scored."""
    return {"frames": len(run.plan.excluded), "scored": not skip_excluded, "reasons": dict(run.plan.excluded)}


def _same_structures(dataset: Dataset, run: Run) -> Dataset:
    """The data set, if it has the run's structures (in its order).

    Raises:
        UsageError: Naming both lists and the flag that reads the data so.
    """
    if list(dataset.classes) != run.classes:
        found = ", ".join(dataset.classes) or "one structure"
        wanted = ", ".join(run.classes) or "one structure"
        raise UsageError(
            f"{dataset.root}: read as {found}, but {run.path} segments {wanted}; read it with the run's --classes (or --mask-value)"
        )
    return dataset


def score_frames(
    frames: Iterable[HeldOutFrame],
    posts: list[PostProcess],
    observe: Callable[[HeldOutFrame, dict], None] | None = None,
    classes: list[str] | None = None,
) -> tuple[list[dict], np.ndarray]:
    """Per-frame rows (areas, Dice, IoU, empty flags) and tp/fp/fn counts after the post-processing: one row and one
    count per (frame, structure).

    Args:
        frames: Held-out predictions (:func:`medseg.infer.heldout.held_out_frames`).
        posts: The post-processing that turns each structure's probabilities into its mask.
        observe: Called with each frame and its row as it is scored (the report keeps its gallery so); for
            several structures with a row of the frame (its mean Dice, and its structures' rows under ``classes``).
        classes: The structures' names, for a run of several (each row names its structure); left out for one.

    Shape:
        Returns: rows, and counts (N * C, 3), frame by frame.
    """
    rows, counts = [], []
    for frame in frames:
        masks = frame.prediction.mask(posts)
        mine = []
        for name, mask, truth in zip(classes or [None], masks, frame.truth, strict=True):
            count = metrics.confusion_counts(mask[None], truth[None])
            counts.append(count[0])
            mine.append(_row(frame.id, frame.fold, count, name))
        rows += mine
        if observe is not None:
            observe(frame, _frame_row(mine) if classes else mine[0])
    return rows, np.array(counts, dtype=np.int64).reshape(-1, 3)


def _frame_row(rows: list[dict]) -> dict:
    """A frame's row when it has several structures: its mean Dice, and each structure's row."""
    return {"id": rows[0]["id"], "fold": rows[0]["fold"], "dice": float(np.mean([row["dice"] for row in rows])), "classes": rows}


def _per_structure(rows: list[dict], counts: np.ndarray, classes: list[str]) -> dict:
    """Each structure's summary, from the (frame, structure) counts."""
    names = np.array([row["class"] for row in rows])
    return {"classes": {name: metrics.summary(counts[names == name]) for name in classes}}


def _row(sample_id: str, fold: int | None, count: np.ndarray, structure: str | None = None) -> dict:
    tp, fp, fn = (int(v) for v in count[0])
    return {
        "id": sample_id,
        **({"class": structure} if structure is not None else {}),
        "fold": "" if fold is None else fold,
        "truth_area": tp + fn,
        "pred_area": tp + fp,
        "dice": round(float(metrics.dice_per_image(count)[0]), 6),
        "iou": round(float(metrics.iou_per_image(count)[0]), 6),
        "truth_empty": tp + fn == 0,
        "pred_empty": tp + fp == 0,
    }


def _write(out: Path, rows: list[dict], summary: dict, columns: tuple[str, ...]) -> None:
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    with atomic_write(out / PER_IMAGE_FILE) as stream:
        stream.write(buffer.getvalue())
    runs.write_json(out / SUMMARY_FILE, summary)
