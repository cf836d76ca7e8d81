"""The run folder: the one owner of every file a training run keeps, from ``medseg train`` to the report.

```
RUN/
  run.json           RunPlan: data folder, folds trained, frames with a structure, frames left out and why, medseg version
  config.yaml        the resolved configuration (read and written by medseg.config)
  split.json         the subject-grouped folds (read and written by medseg.data.splits)
  versions.json      Versions: python, torch, smp, lightning, CUDA, GPU; encoder weights used and why
  data_summary.json  frames, empty share, subjects, sizes, mask areas of the training data (the inspector's summary)
  postprocess.json   Tuning: threshold, minimum area, presence threshold, the grid and its scores (medseg tune)
  checkpoints/       best.ckpt (weights at the lowest validation loss), last.ckpt (for --resume)   (single run)
  metrics.csv        one row per epoch                                                         (single run)
  done.json          FoldResult: how the (sub-)run ended; --resume skips it                    (single run)
  tensorboard/       Lightning's TensorBoard logs, when tensorboard is installed                (single run)
  fold_K/            checkpoints/, metrics.csv, done.json, tensorboard/ per fold                 (--folds N)
  model.onnx         the fold ensemble for ONNX Runtime, model.json its settings (medseg export, predict --engine onnx)
  evaluation/NAME/   per_image.csv and summary.json of `medseg evaluate RUN NAME`
  report.html        the report (medseg report, and train, tune and demo at their end); report/ its figures as PNGs
```
A single run keeps its fold files at the top. Nothing is overwritten without ``--force``. The JSON files
are typed (pydantic): a file from a newer medseg or a damaged one is one line naming it. Checkpoints are
read with ``weights_only=True``: loading a run someone hands you never runs code from it.
"""

from __future__ import annotations

import csv
import io as text_io
import json
import os
import pickle
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medseg import __version__
from medseg.config import Config, read_run_config
from medseg.errors import MedsegError, UsageError
from medseg.files import atomic_write

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
VERSIONS_FILE = "versions.json"
DATA_SUMMARY_FILE = "data_summary.json"
POSTPROCESS_FILE = "postprocess.json"
METRICS_FILE = "metrics.csv"
DONE_FILE = "done.json"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
ONNX_FILE = "model.onnx"
EVALUATION_DIR = "evaluation"
REPORT_FILE = "report.html"
FIGURES_DIR = "report"
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_score", "lr", "images_per_s", "epoch_seconds")
FORMAT = 1  # the run-file format this medseg writes and reads; a newer medseg that changes it raises it
_PACKAGES = ("torch", "torchvision", "segmentation-models-pytorch", "lightning", "albumentations", "numpy", "timm")

File = TypeVar("File", bound="RunFile")


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
    """

    data: str
    n_folds: int = Field(ge=2)
    folds: list[int]
    several: bool
    train_non_empty: int | None = None
    medseg: str | None = None
    classes: list[str] = []
    class_non_empty: dict[str, int] = {}
    class_labels: dict[str, str] = {}
    class_values: dict[str, int] = {}
    excluded: dict[str, str] = {}


class FoldResult(RunFile):
    """``done.json``: how one (sub-)run ended.

    Attributes:
        fold: The validation fold.
        epochs: Epochs trained in total.
        best_val_loss: Lowest validation loss.
        best_val_score: Validation score (threshold 0.5, network size) at the best epoch.
        stopped_early: Whether early stopping ended it.
    """

    fold: int
    epochs: int
    best_val_loss: float
    best_val_score: float
    stopped_early: bool


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
    cpu_count: int | None = None
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

    Shape:
        scores: (T, A).
    """

    threshold: float
    min_area: int
    presence_threshold: float = 0.0
    presence_head: bool = False
    score_before: float | None = None
    score_after: float | None = None
    cross_fitted: float | None = None
    frames: int | None = None
    out_of_fold: bool | None = None
    tta: str | None = None
    thresholds: list[float] = []
    min_areas: list[int] = []
    scores: list[list[float]] = []
    presence_thresholds: list[float] = [0.0]
    presence_scores: list[float] = []

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

    classes: dict[str, Tuning]
    score_before: float
    score_after: float
    cross_fitted: float | None = None
    frames: int
    out_of_fold: bool
    tta: str


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

    def result(self) -> FoldResult | None:
        """How the (sub-)run ended, or ``None`` while it has not."""
        return FoldResult.read(self.done_file) if self.done else None


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

    def tuning(self) -> Tuning | StructuresTuning | None:
        """The tuned post-processing (one per structure when there are several), or ``None`` before ``medseg tune``."""
        path = self.path / POSTPROCESS_FILE
        if not path.is_file():
            return None
        return StructuresTuning.read(path) if self.classes else Tuning.read(path)

    def versions(self) -> Versions:
        """The software and hardware it trained with."""
        return Versions.read(self.path / VERSIONS_FILE)

    def data_summary(self) -> dict[str, Any] | None:
        """The inspector's summary of the training data, or ``None`` for a run written before it was kept."""
        path = self.path / DATA_SUMMARY_FILE
        return read_json(path) if path.is_file() else None

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
    """Read a run folder and check that every fold has its best checkpoint.

    Raises:
        UsageError: If it is not a run folder, a run file is damaged, or a fold has no checkpoint yet.
    """
    path = Path(path)
    if not (path / RUN_FILE).is_file():
        raise UsageError(f"{path}: not a medseg run folder ({RUN_FILE} missing); train one with `medseg train DATA --out {path}`")
    plan = RunPlan.read(path / RUN_FILE)
    folds = fold_dirs(path, plan.folds, plan.several)
    for fold in folds:
        if not fold.best.is_file():
            raise UsageError(f"{fold.best}: missing; the run did not finish a first epoch, continue it with `medseg train --resume`")
    return Run(path, read_run_config(path / CONFIG_FILE), plan, folds)


def read_checkpoint(path: Path, fix: str) -> Any:
    """A checkpoint's content, loaded with ``weights_only=True``: tensors and plain values only, no code.

    Args:
        path: The checkpoint.
        fix: What the user can do about a bad file, for the message.

    Raises:
        CheckpointError: If the file is truncated or corrupt, or holds objects other than weights.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _first_line(error).split(". ")[0]
        raise CheckpointError(f"{path}: refused: it holds objects other than weights, which could run code ({reason}); {fix}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({_first_line(error)}); {fix}") from None


def check_run_folder(run: Path, force: bool, resume: bool) -> None:
    """Check, without changing anything, that a run may be written into ``run``.

    Args:
        run: The run folder.
        force: Replace an existing run folder.
        resume: Continue the run in ``run``.

    Raises:
        UsageError: If ``run`` holds files and neither flag allows using it, if ``--force`` would delete
            a folder that is not a medseg run, or if ``--resume`` finds no run to continue.
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
        return
    if occupied and not force:
        raise UsageError(f"{run}: folder exists and is not empty; use --force to replace the run or --resume to continue it")
    if occupied and not (run / RUN_FILE).is_file() and not (run / CONFIG_FILE).is_file():
        raise UsageError(f"{run}: not a medseg run folder, so --force will not delete it; choose another --out")


def replace_run_folder(run: Path, force: bool) -> None:
    """Check again that a new run may be written into ``run`` (:func:`check_run_folder`), then create it.

    With ``force`` an earlier run in ``run`` is deleted: call this only once the new run's data has
    loaded, so that a mistyped data folder does not cost the old run.

    Raises:
        UsageError: As :func:`check_run_folder`.
    """
    run = Path(run)
    check_run_folder(run, force=force, resume=False)
    if run.is_dir() and any(run.iterdir()):
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the per-epoch table (:data:`METRIC_COLUMNS`) atomically."""
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as stream:
        stream.write(buffer.getvalue())


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv``."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically, readable by people (indented)."""
    with atomic_write(path) as stream:
        json.dump(content, stream, indent=2, default=str)
        stream.write("\n")


def read_json(path: Path) -> Any:
    """Read a JSON file of a run.

    Raises:
        UsageError: If it is missing or not JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: not found; is this a medseg run folder?") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({error}); the run folder is damaged") from error


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


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
