"""The run folder: the one owner of every file a training run keeps, from ``medseg train`` to the report.

```
RUN/
  run.json           RunPlan: data folder, folds trained, frames with a structure, frames left out and why, medseg version
  config.yaml        the resolved configuration (read and written by medseg.config)
  split.json         the subject-grouped folds (read and written by medseg.data.splits)
  versions.json      Versions: python, torch, smp, lightning, CUDA, GPU; encoder weights used and why
  data_summary.json  frames, empty share, subjects, sizes, mask areas of the training data (the inspector's summary)
  frames.json        TrainedFrames: a content digest of every frame the folds trained or validated on
  postprocess.json   Tuning: threshold, minimum area, presence threshold, the grid and its scores (medseg tune)
  checkpoints/       best.ckpt (weights at the lowest validation loss), last.ckpt (for --resume)   (single run)
  metrics.csv        one row per epoch                                                         (single run)
  done.json          FoldResult: how the (sub-)run ended; --resume skips it                    (single run)
  tensorboard/       Lightning's TensorBoard logs, when tensorboard is installed                (single run)
  fold_K/            checkpoints/, metrics.csv, done.json, tensorboard/ per fold                 (--folds N)
  model.onnx         the fold ensemble for ONNX Runtime, model.json its settings (medseg export, predict --engine onnx)
  held_out/          the held-out predictions, made once and read by tune, evaluate and report (medseg.infer.kept):
                     fold_K.TTA.npz (fold K's validation frames by fold K's model), left_out.TTA.npz (the frames
                     left out of training, by every fold); 8-bit probabilities at the frame's size, deflated
  evaluation/NAME/   per_image.csv and summary.json of `medseg evaluate RUN NAME`
  report.html        the report (medseg report, and train, tune and demo at their end); report/ its figures as PNGs
```
A single run keeps its fold files at the top. Nothing is overwritten without ``--force``. The JSON files
are typed (pydantic): a file from a newer medseg or a damaged one is one line naming it. Checkpoints are
read with ``weights_only=True``: loading a run someone hands you never runs code from it.
"""

from __future__ import annotations

import contextlib
import csv
import io as text_io
import json
import math
import os
import pickle
import platform
import re
import secrets
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg import __version__
from medseg.config import MAX_EPOCHS, MAX_FOLDS, MAX_LABEL, MAX_STRUCTURES, Config, check_class_name, read_run_config
from medseg.errors import MedsegError, UsageError
from medseg.files import MAX_TEXT_BYTES, OutputExistsError, atomic_write, first_line, inside, read_bounded, safe_file_name

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
PSEUDO_EXAMPLES_FILE = "pseudo_examples.npz"
SPLIT_FILE = "split.json"
VERSIONS_FILE = "versions.json"
DATA_SUMMARY_FILE = "data_summary.json"
POSTPROCESS_FILE = "postprocess.json"
FRAMES_FILE = "frames.json"
METRICS_FILE = "metrics.csv"
DONE_FILE = "done.json"
LOCK_FILE = ".training.json"  # held while a process trains the fold (training_lock)
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
ONNX_FILE = "model.onnx"
EVALUATION_DIR = "evaluation"
KEPT_DIR = "held_out"
LEFT_OUT_GROUP = "left_out"  # the kept group of the frames the run left out of training (medseg.infer.kept)
KEPT_GROUPS = (r"fold_\d+", LEFT_OUT_GROUP)  # the kept files' groups: fold_K, and the left-out frames
# The test-time augmentations (medseg.infer.predict), as postprocess.json and the kept files' names give them
TTA_MODES = ("none", "hflip", "hvflip")
REPORT_FILE = "report.html"
FIGURES_DIR = "report"
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_score", "lr", "images_per_s", "epoch_seconds")
FORMAT = 1  # the run-file format this medseg writes and reads; a newer medseg that changes it raises it
_PACKAGES = ("torch", "torchvision", "segmentation-models-pytorch", "lightning", "albumentations", "numpy", "timm")

File = TypeVar("File", bound="RunFile")
MAX_AREA = 2**31 - 1  # pixels: a minimum mask area above any frame's (an int32 count)
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]  # a Dice mean
Area = Annotated[int, Field(ge=0, le=MAX_AREA)]


class CheckpointError(MedsegError):
    """A checkpoint that cannot be loaded safely: truncated, corrupt, or holding more than weights."""


class RunFile(BaseModel):
    """A JSON file of a run folder, typed; unknown keys are refused (they mean a newer or a foreign file).

    Attributes:
        format: The run-file format it was written in (:data:`FORMAT`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT

    @classmethod
    def read(cls, path: Path) -> Self:
        """Read and check the file.

        Raises:
            UsageError: If it is missing, not JSON, from a newer medseg, or does not hold what it must.
        """
        content = read_json(path)
        written = content.get("format", FORMAT) if isinstance(content, dict) else FORMAT
        if isinstance(written, int) and written > FORMAT:
            raise UsageError(
                f"{path}: written by a newer medseg (run-file format {written}; this one reads {FORMAT}); upgrade medseg to use the run"
            )
        try:
            return cls.model_validate(content)
        except ValidationError as error:
            raise UsageError(f"{path}: not a valid {cls.__name__} file ({validation_errors(error)}); the run folder is damaged") from None

    def write(self, path: Path) -> None:
        """Write the file atomically."""
        write_json(path, self.model_dump(mode="json"))


class PseudoRecord(BaseModel):
    """What a run learnt from frames without labels (``train --unlabeled FRAMES --teacher RUN``), in ``run.json``.

    Attributes:
        teacher: The teacher run folder (absolute).
        teacher_run_id: The teacher's identity when it labelled (its configuration, checkpoints and tuning digested).
        frames: The folder of frames (absolute).
        rule: The confidence rule's settings.
        ids: The frames, by id.
        digests: Each frame's content digest, in the order of ``ids`` (a changed frame is told on ``--resume``).
        sources: By fold: which teacher model's masks it trained on (``-1``: the fold ensemble, else a teacher fold).
        kept: By fold: how many pseudo-labelled frames it trained on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: str
    teacher_run_id: str
    frames: str
    rule: dict[str, float]
    ids: list[str]
    digests: list[str]
    sources: dict[int, int] = {}
    kept: dict[int, Annotated[int, Field(ge=0)]] = {}


class RunPlan(RunFile):
    """``run.json``: what a run trains.

    Attributes:
        data: The data folder (absolute).
        n_folds: Folds of the split.
        folds: The validation folds trained, one (sub-)run each.
        several: Whether each fold has its own ``fold_K/`` (else the one run keeps its files at the top).
        train_non_empty: Training frames with a structure (``None`` in runs written before it was recorded).
        medseg: The medseg version that started the run.
        classes: The structures of a run with several per frame, in channel order; empty for one.
        class_non_empty: With several structures, the training frames that have each.
        class_labels: Each structure's label in a long RLE table's class column (a submission writes it back);
            the structure's name for the other layouts.
        class_values: Each structure's mask value when the training masks were class-index files (one value per
            pixel, so the structures exclude each other); empty otherwise. ``predict --masks-dir`` writes such files back.
        excluded: The labelled frames left out of training, validation and tuning (``train --exclude FILE``), each with
            its reason, as the file gave them: the run holds them, not the file. They are in no fold of the split.
        pseudo: The frames without labels it also trained on, their teacher and rule (:class:`PseudoRecord`), if any.
    """

    data: str
    n_folds: int = Field(ge=2, le=MAX_FOLDS)
    folds: list[int] = Field(min_length=1)
    several: bool
    train_non_empty: int | None = Field(None, ge=0)
    medseg: str | None = None
    classes: list[str] = Field([], max_length=MAX_STRUCTURES)
    class_non_empty: dict[str, Annotated[int, Field(ge=0)]] = {}
    class_labels: dict[str, str] = {}
    class_values: dict[str, Annotated[int, Field(ge=0, le=MAX_LABEL)]] = {}
    excluded: dict[str, str] = {}
    pseudo: PseudoRecord | None = None

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: list[str]) -> list[str]:
        for name in value:
            check_class_name(name)
        if len(set(value)) < len(value):
            raise ValueError("a structure is listed twice")
        return value

    @field_validator("class_non_empty", "class_labels", "class_values")
    @classmethod
    def _keys_are_class_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            check_class_name(name)
        return value

    @model_validator(mode="after")
    def _folds_and_structures(self) -> RunPlan:
        outside = [fold for fold in self.folds if not 0 <= fold < self.n_folds]
        if outside:
            raise ValueError(f"folds {outside[:5]} are not folds of a {self.n_folds}-fold split (0 to {self.n_folds - 1})")
        if len(set(self.folds)) < len(self.folds):
            raise ValueError(f"folds {self.folds[:10]} lists a fold twice")
        if not self.several and len(self.folds) != 1:
            raise ValueError(f"several=false (one run at the top of the folder) trains one fold, not {len(self.folds)}")
        for key in ("class_non_empty", "class_labels", "class_values"):
            unknown = sorted(set(getattr(self, key)) - set(self.classes))
            if unknown:
                raise ValueError(f"{key} names {unknown[:3]}, which classes does not list")
        return self


class FoldResult(RunFile):
    """``done.json``: how one (sub-)run ended.

    Attributes:
        fold: The validation fold.
        epochs: Epochs trained in total.
        best_val_loss: Lowest validation loss.
        best_val_score: Validation score (threshold 0.5, network size) at the best epoch.
        stopped_early: Whether early stopping ended it.
    """

    fold: int = Field(ge=0, lt=MAX_FOLDS)
    epochs: int = Field(ge=0, le=MAX_EPOCHS)
    best_val_loss: float
    best_val_score: float
    stopped_early: bool

    @field_validator("best_val_loss", "best_val_score")
    @classmethod
    def _not_infinite(cls, value: float) -> float:
        if value in (math.inf, -math.inf):
            raise ValueError("is infinite; a fold that recorded no epoch keeps NaN")
        return value


class EncoderWeights(BaseModel):
    """How the encoder of a model was initialised.

    Attributes:
        requested: The configured value: ``auto``, ``imagenet``, ``none`` or a file path.
        used: ``imagenet``, ``random`` or ``file:<path>``.
        warning: The warning given when ``auto`` fell back to random initialisation, else None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    requested: str
    used: str
    warning: str | None = None


class Versions(RunFile):
    """``versions.json``: the software and hardware a run trained with; package versions by distribution name.

    Attributes:
        python: Python version.
        platform: Operating system and machine.
        medseg: medseg version.
        cuda: CUDA version torch was built with, if any.
        cuda_available: Whether a CUDA device was there.
        gpu: Name of the first CUDA device.
        cpu_count: CPU cores.
        encoder_weights: How the encoder was initialised (recorded once the first fold starts from them).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    python: str
    platform: str
    medseg: str
    cuda: str | None = None
    cuda_available: bool = False
    gpu: str | None = None
    cpu_count: int | None = Field(None, ge=1)
    encoder_weights: EncoderWeights | None = None

    def package(self, name: str) -> str | None:
        """The recorded version of a package (e.g. ``torch``, ``segmentation-models-pytorch``)."""
        return (self.model_extra or {}).get(name)


class Tuning(RunFile):
    """``postprocess.json``: the post-processing ``medseg tune`` chose and the grid it searched.

    A file written by hand needs only the setting (``threshold`` and ``min_area``, with a presence head
    also ``presence_threshold``); the rest is what ``medseg tune`` records about its search.

    Attributes:
        threshold: Probability threshold.
        min_area: Minimum mask area (original pixels); a smaller mask becomes empty.
        presence_threshold: Presence probability a mask needs (0: the presence decision is off).
        presence_head: Whether the model has a presence head.
        score_before: Score of the untuned setting on the tuning frames.
        score_after: Score of the chosen setting on the same frames.
        cross_fitted: Each fold scored with the setting tuned on the other folds only: what to expect on new
            subjects (runs of several folds; ``None`` otherwise, and in files written before it was kept).
        frames: Frames tuned on.
        out_of_fold: Whether each frame was predicted by the model that did not train on it.
        tta: Test-time augmentation of the predictions.
        thresholds: The thresholds searched.
        min_areas: The minimum areas searched.
        scores: Score per threshold and minimum area at the chosen presence threshold.
        presence_thresholds: The presence thresholds searched.
        presence_scores: Best score per presence threshold.

    Every number is range-checked when the file is read: thresholds and scores in [0, 1], areas from 0 to
    :data:`MAX_AREA`, and the grid's lists as long as the scores say.

    Shape:
        scores: (T, A).
    """

    model_config = ConfigDict(allow_inf_nan=False)

    threshold: Probability
    min_area: Area
    presence_threshold: Probability = 0.0
    presence_head: bool = False
    score_before: Score | None = None
    score_after: Score | None = None
    cross_fitted: Score | None = None
    frames: int | None = Field(None, ge=0)
    out_of_fold: bool | None = None
    tta: str | None = None
    thresholds: list[Probability] = []
    min_areas: list[Area] = []
    scores: list[list[Score]] = []
    presence_thresholds: list[Probability] = [0.0]
    presence_scores: list[Score] = []

    @model_validator(mode="after")
    def _grid_shape(self) -> Tuning:
        if self.scores and (len(self.scores) != len(self.thresholds) or any(len(row) != len(self.min_areas) for row in self.scores)):
            raise ValueError(
                f"scores must have one row per threshold ({len(self.thresholds)}) and one column per minimum area ({len(self.min_areas)})"
            )
        if self.presence_scores and len(self.presence_scores) != len(self.presence_thresholds):
            raise ValueError(
                f"presence_scores has {len(self.presence_scores)} values for {len(self.presence_thresholds)} presence_thresholds"
            )
        return self

    @property
    def searched(self) -> bool:
        """Whether the file records a search (``medseg tune`` wrote it), not only a setting."""
        return bool(self.scores)


class StructuresTuning(RunFile):
    """``postprocess.json`` of a run with several structures: each one's :class:`Tuning`, and the scores over
    every (frame, structure) pair.

    Attributes:
        classes: Each structure's tuning, in channel order.
        score_before: Mean score over (frame, structure) pairs of the untuned setting.
        score_after: The same with each structure's chosen setting.
        cross_fitted: The mean of the structures' cross-fitted scores (runs of several folds).
        frames: Frames tuned on.
        out_of_fold: Whether each frame was predicted by the model that did not train on it.
        tta: Test-time augmentation of the predictions.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    classes: dict[str, Tuning] = Field(min_length=1, max_length=MAX_STRUCTURES)
    score_before: Score
    score_after: Score
    cross_fitted: Score | None = None
    frames: int = Field(ge=0)
    out_of_fold: bool
    tta: str

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: dict[str, Tuning]) -> dict[str, Tuning]:
        for name in value:
            check_class_name(name)
        return value


class TrainedFrames(RunFile):
    """``frames.json``: what a run trained on, by content, so that a copy of its data elsewhere is recognised.

    Attributes:
        digests: Each frame's :func:`~medseg.data.samples.frame_digest`, by id: every frame of the split.
    """

    digests: dict[str, str]


@dataclass(frozen=True)
class FoldDir:
    """Where one (sub-)run of a run folder keeps its files.

    Attributes:
        fold: The validation fold.
        path: ``RUN`` for a single run, ``RUN/fold_K`` for one of several folds.
    """

    fold: int
    path: Path

    @property
    def checkpoints(self) -> Path:
        """The checkpoint folder."""
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        """The checkpoint written at the end of every epoch."""
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        """The checkpoint with the lowest validation loss."""
        return self.checkpoints / BEST

    @property
    def metrics(self) -> Path:
        """The per-epoch metrics table."""
        return self.path / METRICS_FILE

    @property
    def done_file(self) -> Path:
        """The file that marks a finished (sub-)run."""
        return self.path / DONE_FILE

    @property
    def done(self) -> bool:
        """Whether this (sub-)run finished."""
        return self.done_file.is_file()

    @property
    def lock_file(self) -> Path:
        """The file that says which process trains this (sub-)run now (:func:`training_lock`)."""
        return self.path / LOCK_FILE

    def result(self) -> FoldResult | None:
        """How the (sub-)run ended, or ``None`` while it has not."""
        return FoldResult.read(self.done_file) if self.done else None


class TrainingLock(RunFile):
    """``.training.json`` of a (sub-)run being trained: which process trains it.

    Attributes:
        host: The machine's name.
        pid: The process id on that machine.
        started: When it took the lock (ISO 8601, UTC).
    """

    host: str
    pid: int = Field(ge=0)
    started: str


@contextlib.contextmanager
def training_lock(fold: FoldDir) -> Iterator[None]:
    """Hold ``fold``'s training lock while the block trains it, so that two processes never train one fold.

    The lock is a file linked into place only where none exists, whole (written beside it first, then hard-linked: an
    exclusive create that one of two processes wins, also on a shared disk, and never seen half-written). A lock whose
    process is gone (same machine, no such process) is taken over by renaming it away, which only one process can do;
    one that cannot be read is treated as held. The lock is removed when the block ends.

    Raises:
        UsageError: If another living process (or one on another machine) holds it, naming which.
    """
    fold.path.mkdir(parents=True, exist_ok=True)
    mine = TrainingLock(host=socket.gethostname(), pid=os.getpid(), started=datetime.now(UTC).isoformat(timespec="seconds"))
    if not _create_lock(fold.lock_file, mine):
        holder = _lock_holder(fold.lock_file)
        if holder is None or not _gone(holder) or not _take_over(fold.lock_file, holder) or not _create_lock(fold.lock_file, mine):
            raise UsageError(_held_message(fold))
    try:
        yield
    finally:
        if _lock_holder(fold.lock_file) == mine:
            fold.lock_file.unlink(missing_ok=True)


def _held_message(fold: FoldDir) -> str:
    holder = _lock_holder(fold.lock_file)
    who = f"process {holder.pid} on {holder.host} since {holder.started}" if holder else "another process (its lock cannot be read)"
    return f"{fold.path}: fold {fold.fold} is being trained by {who}; wait for it, or delete {fold.lock_file} if that process is gone"


def _create_lock(path: Path, lock: TrainingLock) -> bool:
    """Link a whole lock file into ``path`` unless one is there (``atomic_write(exclusive=True)``)."""
    try:
        with atomic_write(path, exclusive=True) as stream:
            stream.write(lock.model_dump_json())
    except OutputExistsError:
        return False
    return True


def _take_over(path: Path, stale: TrainingLock) -> bool:
    """Move a gone process's lock out of the way; ``False`` if another process did first or the lock is not ``stale``.

    Nothing but that lock file is ever deleted: it is renamed to a name no file has (a random token, checked), deleted
    only when it still holds ``stale``'s exact record (a link or anything else never parses as one), and a lock found
    in its place is linked back, never renamed over whatever appeared at ``path`` meanwhile.
    """
    claimed = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(8)}.stale")
    if claimed.exists() or claimed.is_symlink():
        return False
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return False  # another process took it over first
    if _lock_holder(claimed) != stale:  # a new lock replaced the stale one before the rename: put it back
        with contextlib.suppress(FileExistsError):
            os.link(claimed, path)
            claimed.unlink()
        return False
    claimed.unlink()
    return True


def _lock_holder(path: Path) -> TrainingLock | None:
    """The lock's holder, or ``None`` when it is gone, unreadable (being written, or damaged) or not a regular file
    (a link is never medseg's)."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        return TrainingLock.model_validate_json(path.read_bytes()[:MAX_TEXT_BYTES])
    except (OSError, ValueError):
        return None


def _gone(holder: TrainingLock) -> bool:
    """Whether the lock's process no longer runs (known only for a process of this machine)."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def live_locks(run: Path) -> list[Path]:
    """The training locks under a run folder that a living process (or another machine's) holds."""
    locks = [Path(run) / LOCK_FILE, *Path(run).glob(f"fold_*/{LOCK_FILE}")]
    return [path for path in locks if path.is_file() and (holder := _lock_holder(path)) is not None and not _gone(holder)]


def fold_dirs(run: Path, folds: list[int], several: bool) -> list[FoldDir]:
    """The (sub-)run folders of a run: ``RUN`` itself, or ``RUN/fold_K`` for each fold."""
    return [FoldDir(fold, Path(run) / f"fold_{fold}" if several else Path(run)) for fold in folds]


@dataclass
class Run:
    """A trained run folder, read back.

    Attributes:
        path: The run folder.
        config: Its resolved configuration.
        plan: Its ``run.json``.
        folds: Its (sub-)run folders.
    """

    path: Path
    config: Config
    plan: RunPlan
    folds: list[FoldDir]

    @property
    def data(self) -> Path:
        """The data folder the run was trained on."""
        return Path(self.plan.data)

    @property
    def classes(self) -> list[str]:
        """The structures of a run with several per frame, in channel order; empty for one."""
        return self.plan.classes

    @property
    def config_file(self) -> Path:
        """``config.yaml``."""
        return self.path / CONFIG_FILE

    @property
    def split_file(self) -> Path:
        """``split.json``."""
        return self.path / SPLIT_FILE

    @property
    def postprocess_file(self) -> Path:
        """``postprocess.json`` (written by ``medseg tune``)."""
        return self.path / POSTPROCESS_FILE

    @property
    def report_file(self) -> Path:
        """``report.html``."""
        return self.path / REPORT_FILE

    @property
    def figures_dir(self) -> Path:
        """``report/``: the report's figures as PNGs."""
        return self.path / FIGURES_DIR

    @property
    def onnx_file(self) -> Path:
        """``model.onnx`` (``medseg export``, ``predict --engine onnx``)."""
        return self.path / ONNX_FILE

    def evaluation_dir(self, name: str) -> Path:
        """``evaluation/NAME/``, refused when ``name`` would lead out of ``evaluation/``."""
        return inside(self.path / EVALUATION_DIR, safe_file_name(name))

    @property
    def structures(self) -> int:
        """How many structures the run segments (one output channel each)."""
        return max(1, len(self.classes))

    @property
    def inputs(self) -> list[Path]:
        """The files later stages read from the run: no command may write its output over one of them.

        The kept predictions (``held_out/``) are not among them: one overwritten is found stale and predicted again.
        """
        names = (RUN_FILE, CONFIG_FILE, SPLIT_FILE, VERSIONS_FILE, DATA_SUMMARY_FILE, POSTPROCESS_FILE, FRAMES_FILE)
        files = [self.path / name for name in names]
        return files + [path for fold in self.folds for path in (fold.best, fold.last, fold.metrics, fold.done_file)]

    def tuned_tta(self) -> str:
        """The test-time augmentation the run was tuned with (``hflip``, the default, before tuning or in an older tuning)."""
        tuning = self.tuning()
        return tuning.tta if tuning is not None and tuning.tta else "hflip"

    def tuning(self) -> Tuning | StructuresTuning | None:
        """The tuned post-processing (one per structure when there are several), or ``None`` before ``medseg tune``."""
        path = self.postprocess_file
        if not path.is_file():
            return None
        if not self.classes:
            return Tuning.read(path)
        tuning = StructuresTuning.read(path)
        if list(tuning.classes) != self.classes:
            raise UsageError(
                f"{path}: tunes the structures {list(tuning.classes)[:5]}, but the run has {self.classes[:5]}; "
                f"tune it again with `medseg tune {self.path} --force`"
            )
        return tuning

    def kept_file(self, group: str, tta: str) -> Path:
        """The file of a group's kept held-out predictions (:mod:`medseg.infer.kept`): ``held_out/GROUP.TTA.npz``."""
        return self.path / KEPT_DIR / f"{group}.{tta}.npz"

    def trained_frames(self) -> TrainedFrames | None:
        """The digests of the frames the run trained on, or ``None`` for a run written before they were kept."""
        path = self.path / FRAMES_FILE
        return TrainedFrames.read(path) if path.is_file() else None

    def versions(self) -> Versions:
        """The software and hardware it trained with."""
        return Versions.read(self.path / VERSIONS_FILE)

    def data_summary(self) -> dict[str, Any] | None:
        """The inspector's summary of the training data, or ``None`` for a run written before it was kept."""
        path = self.path / DATA_SUMMARY_FILE
        if not path.is_file():
            return None
        summary = read_json(path)
        if not isinstance(summary, dict):
            raise UsageError(f"{path}: not a data summary (a JSON object); the run folder is damaged")
        return summary

    def best_weights(self, fold: FoldDir) -> dict[str, Any]:
        """The state dict of a fold's best checkpoint, read without running code from the file.

        Raises:
            CheckpointError: If the file is truncated, corrupt or holds more than weights.
        """
        retrain = (
            f"retrain that fold: delete {fold.checkpoints} and {fold.done_file}, then `medseg train {self.data} --out {self.path} --resume`"
        )
        checkpoint = read_checkpoint(fold.best, retrain)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(f"{fold.best}: not a medseg checkpoint (no state_dict); {retrain}")
        return checkpoint["state_dict"]


def open_run(path: Path) -> Run:
    """Read a run folder and check that its plan and configuration agree and every fold has its best checkpoint.

    Raises:
        UsageError: If it is not a run folder, a run file is damaged, ``run.json`` and ``config.yaml`` disagree,
            or a fold has no checkpoint yet.
    """
    path = Path(path)
    if not (path / RUN_FILE).is_file():
        raise UsageError(f"{path}: not a medseg run folder ({RUN_FILE} missing); train one with `medseg train DATA --out {path}`")
    plan = RunPlan.read(path / RUN_FILE)
    config = read_run_config(path / CONFIG_FILE)
    _check_plan_fits_config(path, plan, config)
    folds = fold_dirs(path, plan.folds, plan.several)
    untrained = [fold.fold for fold in folds if not fold.done]
    if untrained and len(folds) > 1:
        names = ", ".join(map(str, untrained))
        raise UsageError(
            f"{path}: fold(s) {names} of {len(folds)} not trained yet (no {DONE_FILE}); train them (`medseg train DATA --out "
            f"{path} --resume`, or `--resume --fold K` for one, from any process that sees the folder), then run this again"
        )
    for fold in folds:
        if not fold.best.is_file():
            raise UsageError(f"{fold.best}: missing; the run did not finish a first epoch, continue it with `medseg train --resume`")
    return Run(path, config, plan, folds)


def _check_plan_fits_config(path: Path, plan: RunPlan, config: Config) -> None:
    """``run.json``'s folds and structures must be the ones ``config.yaml`` trained (a run writes both from one plan).

    Raises:
        UsageError: Naming both files and what they disagree on.
    """
    structures = max(1, len(plan.classes))
    problem = None
    if config.split.n_folds != plan.n_folds:
        problem = f"n_folds {plan.n_folds} against split.n_folds {config.split.n_folds}"
    elif config.model.structures != structures:
        problem = f"{structures} structure(s) against model.structures {config.model.structures}"
    if problem:
        raise UsageError(f"{path}: {RUN_FILE} and {CONFIG_FILE} disagree ({problem}); the run folder is damaged")


def read_checkpoint(path: Path, fix: str) -> Any:
    """A checkpoint's content, loaded with ``weights_only=True``: tensors and plain values only, no code.

    Args:
        path: The checkpoint.
        fix: What the user can do about a bad file, for the message.

    Raises:
        CheckpointError: If the file is truncated or corrupt, or holds objects other than weights.
    """
    import torch

    _check_checkpoint_file(Path(path), fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = first_line(error).split(". ")[0]
        raise CheckpointError(f"{path}: refused: it holds objects other than weights, which could run code ({reason}); {fix}") from None
    except Exception as error:  # the weights-only unpickler fails in many ways on a damaged file
        reason = f"{type(error).__name__}: {first_line(error)}"
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({reason}); {fix}") from error


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6


def _check_checkpoint_file(path: Path, fix: str) -> None:
    """Refuse, before unpickling, what cannot be a checkpoint: no regular file (a folder, a device, a pipe) or no zip archive.

    Raises:
        CheckpointError: Naming the file and the fix.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a link to a folder, a device or a pipe?); {fix}")
    with open(path, "rb") as handle:
        start = handle.read(len(_ZIP_MAGIC))
    if start != _ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive); {fix}")


def check_run_folder(run: Path, force: bool, resume: bool) -> None:
    """Check, without changing anything, that a run may be written into ``run``.

    Args:
        run: The run folder.
        force: Replace an existing run folder.
        resume: Continue the run in ``run``.

    Raises:
        UsageError: If ``run`` holds files and neither flag allows using it, if ``--force`` would delete
            a folder that is not a medseg run or one that holds files medseg did not write, or if
            ``--resume`` finds no run to continue (or one stopped before its configuration was written).
    """
    run = Path(run)
    if resume and force:
        raise UsageError("--resume and --force exclude each other: --resume continues RUN, --force replaces it")
    if run.exists() and not run.is_dir():
        raise UsageError(f"{run}: exists and is not a folder; choose another --out")
    occupied = run.is_dir() and any(run.iterdir())
    if resume:
        if not (run / RUN_FILE).is_file():
            raise UsageError(f"{run}: no run to resume ({RUN_FILE} missing); start it without --resume")
        if not (run / CONFIG_FILE).is_file():  # run.json is written first, so that --force may replace such a folder
            raise UsageError(
                f"{run}: {CONFIG_FILE} missing (the run was stopped while its folder was being written, before any fold "
                "trained, or the file was deleted); nothing can resume without it: start the run again with --force"
            )
        return
    if occupied and not force:
        raise UsageError(f"{run}: folder exists and is not empty; use --force to replace the run or --resume to continue it")
    if occupied:
        check_replaceable(run, RUN_TREE, RUN_FILE, RunPlan)
        if locks := live_locks(run):
            raise UsageError(f"{run}: a process is training it now ({locks[0]}); --force does not replace a run being trained")


def replace_run_folder(run: Path, force: bool) -> None:
    """Check again that a new run may be written into ``run`` (:func:`check_run_folder`), then create it.

    With ``force`` the files of an earlier run in ``run`` are deleted, and only those (:data:`RUN_TREE`):
    call this only once the new run's data has loaded, so that a mistyped data folder does not cost the old run.

    Raises:
        UsageError: As :func:`check_run_folder`.
    """
    run = Path(run)
    check_run_folder(run, force=force, resume=False)
    if run.is_dir():
        delete_ours(run, RUN_TREE)
        return
    try:
        run.mkdir(parents=True)
    except FileExistsError:
        raise UsageError(f"{run}: appeared while this run was starting (another medseg train?); choose another --out") from None


# What medseg writes in a folder, as a tree of name patterns: a pattern maps to None (a file) or to a sub-tree
# (a folder whose entries must match it).
_TEMPORARY = r"\..+\.tmp"  # atomic_write's temporary files, left by a killed write
_CHECKPOINTS_TREE = {re.escape(BEST): None, re.escape(LAST): None, _TEMPORARY: None}
_FOLD_TREE = {
    re.escape(CHECKPOINTS): _CHECKPOINTS_TREE,
    re.escape(METRICS_FILE): None,
    re.escape(DONE_FILE): None,
    re.escape(LOCK_FILE): None,
    re.escape(LOCK_FILE) + r"\.\d+\.[0-9a-f]{16}\.stale": None,  # a gone process's lock, being taken over
    "tensorboard": {r"version_\d+": {r"events\.out\.tfevents\..+": None, r"hparams\.yaml": None}},  # Lightning's TensorBoard logs
    _TEMPORARY: None,
}
RUN_TREE: dict = {
    **_FOLD_TREE,
    **{
        re.escape(name): None
        for name in (RUN_FILE, CONFIG_FILE, SPLIT_FILE, VERSIONS_FILE, DATA_SUMMARY_FILE, POSTPROCESS_FILE, FRAMES_FILE)
    },
    **{re.escape(name): None for name in (ONNX_FILE, "model.json", REPORT_FILE, PSEUDO_EXAMPLES_FILE)},
    r"fold_\d+": _FOLD_TREE,
    re.escape(EVALUATION_DIR): {r"[^/]+": {r"per_image\.csv": None, r"summary\.json": None, _TEMPORARY: None}},
    re.escape(KEPT_DIR): {rf"(?:{'|'.join(KEPT_GROUPS)})\.(?:{'|'.join(TTA_MODES)})\.npz": None, _TEMPORARY: None},
    re.escape(FIGURES_DIR): {r"[A-Za-z0-9_.\-]+\.png": None, _TEMPORARY: None},
}


def foreign_entries(folder: Path, tree: dict) -> list[Path]:
    """The files and folders under ``folder`` that ``tree`` does not describe: what medseg did not write.

    A link is never medseg's (deleting through it could reach anything).
    """
    found = []
    for entry in sorted(Path(folder).iterdir()):
        spec = _spec_of(tree, entry)
        if spec is False or (spec is None) != entry.is_file():
            found.append(entry)
        elif spec is not None:
            found += foreign_entries(entry, spec)
    return found


def _spec_of(tree: dict, entry: Path) -> dict | None | bool:
    """What ``tree`` says of ``entry``: None (a file of medseg's), a sub-tree (a folder of medseg's), or False (not
    medseg's: no pattern matches, or it is a link, which deleting through could reach anything)."""
    if entry.is_symlink():
        return False
    return next((tree[pattern] for pattern in tree if re.fullmatch(pattern, entry.name)), False)


def check_replaceable(folder: Path, tree: dict, marker: str, marker_type: type[RunFile], what: str = "run folder") -> None:
    """Refuse to let ``--force`` replace ``folder`` unless medseg wrote it and it holds nothing else.

    Args:
        folder: The folder ``--force`` would replace.
        tree: What medseg writes there (:data:`RUN_TREE`).
        marker: The typed file only medseg writes there (``run.json``).
        marker_type: Its type: the file must read back as one.
        what: What the folder is (``run folder``, ``demo folder``), for the message.

    Raises:
        UsageError: If the marker is missing or does not read back, or anything else is in the folder.
    """
    try:
        marker_type.read(folder / marker)
    except MedsegError:
        raise UsageError(
            f"{folder}: not a medseg {what} (no readable {marker}), so --force will not delete anything in it; choose another --out"
        ) from None
    foreign = foreign_entries(folder, tree)
    if foreign:
        shown = ", ".join(str(path.relative_to(folder)) for path in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(
            f"{folder}: holds {len(foreign)} file(s) medseg did not write ({shown}), so --force will not replace it; "
            "move them out or choose another --out"
        )


def delete_ours(folder: Path, tree: dict) -> None:
    """Delete what ``tree`` describes in ``folder`` (checked first with :func:`check_replaceable`), nothing else."""
    for entry in Path(folder).iterdir():
        spec = _spec_of(tree, entry)
        if spec is None and entry.is_file():
            entry.unlink()
        elif isinstance(spec, dict) and entry.is_dir():
            delete_ours(entry, spec)
            with contextlib.suppress(OSError):
                entry.rmdir()


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the per-epoch table (:data:`METRIC_COLUMNS`) atomically."""
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as stream:
        stream.write(buffer.getvalue())


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv``, read bounded in size and checked: ``epoch`` a whole number from 1, the
    losses, score, learning rate and throughput numbers where a row has them (NaN where an epoch had none).

    Raises:
        UsageError: If the file is too large, not CSV, or a row lacks one of those or holds something else.
    """
    try:
        rows = list(csv.DictReader(text_io.StringIO(read_bounded(Path(path), MAX_TEXT_BYTES, "metrics table"), newline="")))
    except csv.Error as error:
        raise UsageError(f"{path}: not a metrics table ({first_line(error)}); the run folder is damaged") from None
    for line, row in enumerate(rows, start=2):
        problem = _metrics_row_problem(row)
        if problem:
            raise UsageError(f"{path}: line {line}: {problem}; the run folder is damaged (train that fold again)")
    return rows


_METRIC_NUMBERS = ("train_loss", "val_loss", "val_score", "lr", "images_per_s")


def _metrics_row_problem(row: dict[str, str]) -> str | None:
    """What is wrong with one row of ``metrics.csv``, or ``None``."""
    epoch = row.get("epoch")
    if not isinstance(epoch, str) or not epoch.strip().isdigit() or not 1 <= int(epoch) <= MAX_EPOCHS:
        return f"epoch {epoch!r} is not an epoch number (1 to {MAX_EPOCHS})"
    for column in _METRIC_NUMBERS:
        if row.get(column) in (None, ""):  # a column an older medseg did not write, or an epoch without the value
            continue
        try:
            float(row[column])
        except ValueError:
            return f"{column} {row.get(column)!r} is not a number"
    return None


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically, readable by people (indented)."""
    with atomic_write(path) as stream:
        json.dump(content, stream, indent=2, default=str)
        stream.write("\n")


def read_json(path: Path) -> Any:
    """Read a JSON file of a run (or of a study folder), bounded in size (:data:`~medseg.files.MAX_TEXT_BYTES`).

    Raises:
        UsageError: If it is missing, too large, not UTF-8, not JSON, or nested deeper than Python can read.
    """
    try:
        return json.loads(read_bounded(Path(path), MAX_TEXT_BYTES, "run file"))
    except FileNotFoundError:
        raise UsageError(f"{path}: not found; is this a medseg run folder?") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply to be a medseg file; the run folder is damaged") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({first_line(error)}); the run folder is damaged") from None


def validation_errors(error: ValidationError) -> str:
    """Every problem pydantic found, each as ``key: message``, joined into one line."""
    return "; ".join(f"{'.'.join(str(part) for part in item['loc']) or 'file'}: {item['msg']}" for item in error.errors())


def versions() -> Versions:
    """Versions of Python, medseg and the libraries that decide the numbers, and the accelerator."""
    import torch

    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "medseg": __version__}
    for package in _PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["cuda"] = torch.version.cuda
    found["cuda_available"] = torch.cuda.is_available()
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    found["cpu_count"] = os.cpu_count()
    return Versions.model_validate(found)


def installation_versions() -> dict[str, str]:
    """Python, the platform, and the installed version of every dependency medseg declares (not its extras)."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for requirement in metadata.requires("medseg") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    import torch

    found["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
    return found
