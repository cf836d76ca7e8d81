"""Pseudo-labels: a teacher run's confident masks for frames without labels, for a student run to train on.

The teacher's fold models each predict the frames (with the teacher's tuned TTA), and so does their mean (the fold
ensemble); each frame's mask comes from the teacher's tuned post-processing. A mask is kept only where the teacher is
sure of it (:class:`ConfidenceRule`); :class:`~medseg.learn.pseudo.PseudoLabels` then decides which model's masks each
student fold may learn from, so that no validation frame's label reaches the model validated on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medseg.config import Config, read_run_config
from medseg.data import io, splits
from medseg.data.samples import frame_digest
from medseg.devices import device_for
from medseg.errors import UsageError
from medseg.infer.kept import run_identity
from medseg.infer.outputs import frame_records
from medseg.infer.predict import PostProcess, Prediction, load_fold_model, predict_frames, read_postprocess
from medseg.learn.pseudo import ENSEMBLE, PseudoLabels
from medseg.runs import CONFIG_FILE, RUN_FILE, SPLIT_FILE, Run, RunPlan, open_run

CHUNK = 64
"""Frames predicted by every teacher model at a time (the probabilities of a chunk are held, not of all frames)."""


@dataclass(frozen=True)
class ConfidenceRule:
    """When a teacher's mask of a frame is sure enough to train on.

    Every structure of the frame must be sure:

    - its presence: with a presence head (and the presence decision on), the presence probability lies at least
      ``presence_margin`` of the way from the tuned presence threshold to 0 (absent: the empty mask is sure) or to 1;
    - an empty mask the presence decision did not make: no pixel within ``border`` below the pixel threshold
      (nothing nearly drawn);
    - a mask: at most ``unsure_share`` of its pixels lie within ``border`` of the pixel threshold (a sharp outline,
      not a blur the threshold cut through).

    Attributes:
        presence_margin: The share of the way from the presence threshold to 0 or 1.
        border: The distance from the pixel threshold within which a pixel is unsure.
        unsure_share: The most unsure pixels a kept mask may have, as a share of its area.
    """

    presence_margin: float = 0.6
    border: float = 0.1
    unsure_share: float = 0.2

    def sure_mask(self, prediction: Prediction, posts: Sequence[PostProcess]) -> np.ndarray | None:
        """The post-processed masks of a frame (C, H, W) when every structure is sure, else ``None``."""
        masks = prediction.mask(posts)
        for probs, presence, post, mask in zip(prediction.probs, prediction.presence, posts, masks, strict=True):
            if not self._sure(probs, float(presence), post, mask):
                return None
        return masks

    def _sure(self, probs: np.ndarray, presence: float, post: PostProcess, mask: np.ndarray) -> bool:
        """Whether one structure's mask is sure (see the class)."""
        decided = not math.isnan(presence) and post.presence_threshold > 0
        if decided:
            absent = presence <= post.presence_threshold * (1 - self.presence_margin)
            present = presence >= post.presence_threshold + (1 - post.presence_threshold) * self.presence_margin
            if absent:
                return True
            if not present:
                return False
        area = int(np.count_nonzero(mask))
        if area == 0:
            return not bool((probs >= post.threshold - self.border).any())
        unsure = int(np.count_nonzero(np.abs(probs - post.threshold) < self.border))
        return unsure <= self.unsure_share * area


@dataclass(frozen=True)
class PseudoRequest:
    """What to pseudo-label.

    Attributes:
        teacher: The teacher run folder (trained, and best tuned).
        frames: The folder of frames without labels.
        rule: When a mask is sure enough.
    """

    teacher: Path
    frames: Path
    rule: ConfidenceRule = ConfidenceRule()


def pseudo_label(request: PseudoRequest, student: Config, on_message: Callable[[str], None] = print) -> tuple[PseudoLabels, dict]:
    """The teacher's sure masks of the frames, by teacher model, and what to record of them in the student's run.

    Args:
        request: The teacher, the frames and the rule.
        student: The student's configuration (structures and input size must be the teacher's).
        on_message: Told what is predicted and how many frames are kept.

    Returns:
        The pseudo-labels and their record (``run.json``'s ``pseudo``): teacher, its run id, the rule, the frames.

    Raises:
        UsageError: A teacher of other structures or input size, a folder without frames.
        ImageReadError: A frame that cannot be read.
    """
    teacher = open_run(request.teacher)
    _check_teacher(teacher, student)
    records = frame_records(Path(request.frames), student.data.max_pixels, on_message)
    frames = [
        io.read_image(record.image_path, teacher.config.data.intensity_window, max_pixels=student.data.max_pixels) for record in records
    ]
    posts, tta = read_postprocess(teacher), teacher.tuned_tta()
    on_message(
        f"pseudo-labelling {len(frames)} frames of {request.frames} with {len(teacher.folds)} fold model(s) of {teacher.path}, TTA {tta}"
    )
    masks = _sure_masks(teacher, frames, posts, tta, request.rule)
    labels = PseudoLabels([record.id for record in records], frames, masks, *_teacher_frames(teacher))
    for source in masks:
        who = "the fold ensemble" if source == ENSEMBLE else f"fold {source}'s model"
        on_message(
            f"{who}: {labels.kept(source)} of {len(frames)} frames sure enough to train on ({labels.kept(source) / len(frames):.0%})"
        )
    record = {
        "teacher": str(teacher.path.resolve()),
        "teacher_run_id": run_identity(teacher),
        "frames": str(Path(request.frames).resolve()),
        "rule": asdict(request.rule),
        "ids": labels.ids,
        "digests": [frame_digest(frame) for frame in frames],
    }
    return labels, record


def _check_teacher(teacher: Run, student: Config) -> None:
    """Refuse a teacher whose masks the student cannot learn: other structures or another input size.

    Raises:
        UsageError: Naming what differs.
    """
    if teacher.config.model.structures != student.model.structures:
        raise UsageError(
            f"{teacher.path}: the teacher segments {teacher.config.model.structures} structure(s), the student "
            f"{student.model.structures}; a teacher must segment the student's structures"
        )
    ours, theirs = (student.input.height, student.input.width), (teacher.config.input.height, teacher.config.input.width)
    if ours != theirs:
        raise UsageError(
            f"{teacher.path}: the teacher's input is {theirs[1]}x{theirs[0]}, the student's {ours[1]}x{ours[0]}; "
            f"train the student at the teacher's size (--set input.height={theirs[0]} --set input.width={theirs[1]})"
        )


def _sure_masks(teacher: Run, frames: list[np.ndarray], posts: list[PostProcess], tta: str, rule: ConfidenceRule) -> dict:
    """Each teacher model's sure masks (and the fold ensemble's, the mean of their probabilities), chunk by chunk."""
    device = device_for(teacher.config)
    models = {fold.fold: load_fold_model(teacher, fold, device) for fold in teacher.folds}
    one = teacher.config.model.structures == 1
    masks: dict[int, list] = {source: [] for source in [*models, ENSEMBLE]}
    for start in range(0, len(frames), CHUNK):
        chunk = frames[start : start + CHUNK]
        by_model = {fold: list(predict_frames([model], chunk, teacher.config, tta)) for fold, model in models.items()}
        for index in range(len(chunk)):
            own = [predictions[index] for predictions in by_model.values()]
            for fold, prediction in zip(by_model, own, strict=True):
                masks[fold].append(_shaped(rule.sure_mask(prediction, posts), one))
            masks[ENSEMBLE].append(_shaped(rule.sure_mask(_mean(own), posts), one))
    if len(models) == 1:
        del masks[ENSEMBLE]  # one model: the ensemble is that model
    return masks


def _mean(predictions: list[Prediction]) -> Prediction:
    """The fold ensemble's prediction: the mean of the fold models' probabilities and presence probabilities."""
    probs = np.mean([prediction.probs for prediction in predictions], axis=0)
    presence = np.mean([prediction.presence for prediction in predictions], axis=0)
    return Prediction(probs.astype(np.float32), presence)


def _shaped(masks: np.ndarray | None, one: bool) -> np.ndarray | None:
    """A frame's masks as training masks are: (H, W) for one structure, (C, H, W) for several."""
    return None if masks is None else (masks[0] if one else masks)


def _teacher_frames(teacher: Run) -> tuple[frozenset[str], dict[int, frozenset[str]]]:
    """The digests of every frame the teacher trained or validated on, and of each fold's validation frames.

    Raises:
        UsageError: For a teacher run written before it kept its frames' digests.
    """
    trained = teacher.trained_frames()
    if trained is None:
        raise UsageError(f"{teacher.path}: the teacher run keeps no frames.json (trained by an older medseg); train it again")
    split = splits.load_split(teacher.path / SPLIT_FILE)
    digests = trained.digests
    validation = {fold.fold: frozenset(digests[i] for i in split.folds[fold.fold] if i in digests) for fold in teacher.folds}
    return frozenset(digests.values()), validation


def resumed_pseudo(run: Path, on_message: Callable[[str], None] = print) -> tuple[PseudoLabels | None, dict | None]:
    """A resumed run's pseudo-labels, made again by its teacher from its recorded frames and rule (``None`` for a run
    without them, or one that does not read back: :func:`~medseg.learn.train.train_run` tells why).

    Raises:
        UsageError: If the teacher changed since (another identity: retrained or tuned again).
    """
    plan_file = Path(run) / RUN_FILE
    if not plan_file.is_file():
        return None, None
    record = RunPlan.read(plan_file).pseudo
    if record is None:
        return None, None
    teacher = open_run(Path(record.teacher))
    if run_identity(teacher) != record.teacher_run_id:
        raise UsageError(
            f"{run}: its teacher {record.teacher} changed since the run started (retrained or tuned); start the run again with --force"
        )
    request = PseudoRequest(Path(record.teacher), Path(record.frames), ConfidenceRule(**record.rule))
    return pseudo_label(request, read_run_config(Path(run) / CONFIG_FILE), on_message)
