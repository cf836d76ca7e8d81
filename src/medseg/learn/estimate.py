"""What a training run will cost before it runs: its plan and a time estimate from a few timed steps.

:func:`time_steps` trains a throwaway copy of the run's model for a few steps on real batches of the run's
first fold, at the run's input size, on the run's device and precision (data loading, augmentation,
forward, backward and optimiser step, then a few validation batches), and writes nothing.
:class:`TrainingPlan` multiplies those times by the steps of an epoch, the epochs and the folds, and says
what it found; :func:`cpu_warning` is the line for a GPU-sized run about to train on the CPU.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from medseg.config import Config, TrainerConfig, load_config
from medseg.data.samples import Sample
from medseg.devices import augments_on_device, precision, precision_reason, uses_cuda
from medseg.learn.callbacks import quiet_lightning
from medseg.learn.datamodule import SegmentationDataModule, num_workers
from medseg.learn.models import create_model
from medseg.learn.module import SegmentationModule
from medseg.progress import format_duration

__all__ = ["GPU_SIZED_PIXELS", "FoldFrames", "StepTimes", "TrainingPlan", "cpu_warning", "may_stop_early", "tell_warning", "time_steps"]

GPU_SIZED_PIXELS = 200_000  # the default and kaggle presets' 448x608 is 272,384; the cpu preset's 128x128 is 16,384
WARMUP_STEPS = 1


@dataclass(frozen=True)
class FoldFrames:
    """The frames of one fold a run trains.

    Attributes:
        fold: The validation fold.
        train: Training frames.
        val: Validation frames.
    """

    fold: int
    train: int
    val: int


@dataclass(frozen=True)
class StepTimes:
    """Measured seconds of one training step and one validation batch.

    Attributes:
        train_step: A training step after the warm-up: loading and augmenting a batch, forward, backward, optimiser.
        val_batch: A validation batch (loading, forward, loss and score).
        steps: The training steps timed.
    """

    train_step: float
    val_batch: float
    steps: int


@dataclass(frozen=True)
class TrainingPlan:
    """What a run trains, where, and (with :class:`StepTimes`) about how long it takes.

    Attributes:
        n_folds: Folds of the split.
        folds: The folds the run trains, each with its frames.
        config: The run's resolved configuration.
        times: The timed steps, or ``None`` before they are measured.
    """

    n_folds: int
    folds: list[FoldFrames]
    config: Config
    times: StepTimes | None = None

    def batches(self, fold: FoldFrames) -> tuple[int, int]:
        """Training steps and validation batches of one epoch of ``fold``, as Lightning counts them."""
        trainer = self.config.trainer
        return train_batches(fold.train, trainer), _limited(math.ceil(fold.val / trainer.batch_size), trainer.limit_val_batches)

    def epoch_seconds(self, fold: FoldFrames) -> float | None:
        """Estimated seconds of one epoch of ``fold`` (``None`` without timed steps)."""
        if self.times is None:
            return None
        steps, val_batches = self.batches(fold)
        return steps * self.times.train_step + val_batches * self.times.val_batch

    @property
    def run_seconds(self) -> float | None:
        """Estimated seconds of the whole run at its most epochs (``None`` without timed steps)."""
        if self.times is None:
            return None
        return sum(self.epoch_seconds(fold) for fold in self.folds) * self.config.trainer.max_epochs

    def lines(self) -> list[str]:
        """The plan as lines for people: folds and frames, input, epochs, device, precision, augmentation, estimate."""
        config, trainer = self.config, self.config.trainer
        steps, val_batches = self.batches(self.folds[0])
        patience = trainer.early_stopping_patience
        epochs = (
            f"up to {trainer.max_epochs} a fold (early stopping after {patience} epochs without improvement)"
            if may_stop_early(trainer)
            else f"{trainer.max_epochs} a fold (all of them: early stopping needs {patience} epochs without improvement)"
        )
        lines = [
            f"folds: {len(self.folds)} of a {self.n_folds}-fold subject-grouped split",
            *(f"fold {fold.fold}: {fold.train} training and {fold.val} validation frames" for fold in self.folds),
            (
                f"input: {config.input.height}x{config.input.width}, batch {trainer.batch_size}: "
                f"{steps} training steps and {val_batches} validation batches an epoch (fold {self.folds[0].fold})"
            ),
            f"epochs: {epochs}",
            f"device: {describe_device(config)}; precision {precision_reason(config)}; augmentation {describe_augmentation(config)}",
        ]
        return lines + ([self.estimate_line()] if self.times is not None else [])

    def estimate_line(self) -> str:
        """The time estimate, saying what it was measured on and whether it is an upper bound."""
        times = self.times
        epoch = self.epoch_seconds(self.folds[0])
        bound = " (an upper bound: early stopping may end it sooner)" if may_stop_early(self.config.trainer) else ""
        return (
            f"estimate: {times.train_step:.2f} s a training step, {times.val_batch:.2f} s a validation batch "
            f"(timed on {times.steps} step(s)): {format_duration(epoch)} an epoch, "
            f"{format_duration(self.run_seconds)} for {len(self.folds)} fold(s) x {self.config.trainer.max_epochs} epochs{bound}"
        )


def train_batches(frames: int, trainer: TrainerConfig) -> int:
    """Training steps of an epoch over ``frames`` (the last partial batch is dropped when there are more frames than a batch)."""
    full = frames // trainer.batch_size if frames > trainer.batch_size else 1
    return _limited(full, trainer.limit_train_batches)


def _limited(batches: int, limit: float | None) -> int:
    """Batches after Lightning's ``limit_*_batches`` (a count, or a fraction of them)."""
    if limit is None:
        return batches
    if isinstance(limit, float):
        return max(1, int(batches * limit)) if batches else 0
    return min(batches, int(limit))


def may_stop_early(trainer: TrainerConfig) -> bool:
    """Whether early stopping can end a fold before ``max_epochs`` (else every fold trains every epoch)."""
    return trainer.early_stopping_patience + 1 < trainer.max_epochs


def describe_device(config: Config) -> str:
    """Where the run trains, in words."""
    if uses_cuda(config):
        where = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        where = "cpu (trainer.accelerator=cpu)" if config.trainer.accelerator == "cpu" else "cpu (no CUDA device)"
    trainer = config.trainer
    devices = trainer.devices
    several = devices == -1 or (isinstance(devices, int) and devices > 1) or (isinstance(devices, list) and len(devices) > 1)
    several = several or trainer.num_nodes > 1
    return where + (f", {trainer.devices} device(s) x {trainer.num_nodes} machine(s); timed on one device" if several else "")


def describe_augmentation(config: Config) -> str:
    """Where the training batches are augmented, in words."""
    if augments_on_device(config):
        return "gpu (whole batches on the training device)"
    workers = num_workers(config)
    return f"cpu (Albumentations in {workers} DataLoader worker(s))" if workers else "cpu (Albumentations in the main process)"


def cpu_warning(config: Config, folds: int, seconds: float | None = None, trials: int | None = None) -> str | None:
    """The warning for a GPU-sized input (above :data:`GPU_SIZED_PIXELS`) about to train on the CPU, else ``None``.

    Args:
        config: The run's configuration.
        folds: The folds the run trains.
        seconds: The run's estimated seconds, when known.
        trials: For a sweep, the trials it adds (each trains every fold).
    """
    pixels = config.input.height * config.input.width
    if uses_cuda(config) or pixels <= GPU_SIZED_PIXELS:
        return None
    reason = "trainer.accelerator=cpu" if config.trainer.accelerator == "cpu" else "no CUDA device"
    if seconds is not None:
        estimate = f"estimate: {'up to ' if may_stop_early(config.trainer) else ''}{format_duration(seconds)}"
    elif trials:
        estimate = "the ETA follows the first trial"
    else:
        estimate = "its ETA follows its first epoch; --dry-run estimates it before training"
    what, count = ("sweep", f"{trials} trial(s) x ") if trials else ("run", "")
    cpu = load_config("cpu").input
    return (
        f"{reason}: a GPU-sized {what} ({config.input.height}x{config.input.width} input, {count}{folds} fold(s) x up to "
        f"{config.trainer.max_epochs} epochs) trains on the CPU ({estimate}); "
        f"on a CPU use --preset cpu (one model at {cpu.height}x{cpu.width}), or --preset cpu --folds 5 for every fold"
    )


def tell_warning(warning: str | None, on_warning: Callable[[str], None] | None, on_message: Callable[[str], None]) -> None:
    """Give a warning (if any) to ``on_warning``, or else to ``on_message`` as ``warning: ...``."""
    if warning is not None:
        (on_warning or (lambda line: on_message(f"warning: {line}")))(warning)


def time_steps(config: Config, train: list[Sample], val: list[Sample], steps: int = 2) -> StepTimes:
    """Time a few training steps and validation batches of the run's model on real batches; writes nothing.

    The model is built without pretrained weights (they do not change the time) and trained on one device
    in a temporary folder, for :data:`WARMUP_STEPS` untimed steps and then ``steps`` timed ones (over several
    epochs when an epoch has fewer steps), each epoch followed by up to ``steps`` validation batches.

    Args:
        config: The run's configuration.
        train: Training frames of the first fold.
        val: Its validation frames.
        steps: Training steps (and validation batches) to time.
    """
    model_cfg = config.model.model_copy(update={"encoder_weights": "none"})
    trainer_cfg = config.trainer.model_copy(update={"devices": 1, "num_nodes": 1, "strategy": "auto"})
    config = config.model_copy(update={"model": model_cfg, "trainer": trainer_cfg})
    module = SegmentationModule(create_model(model_cfg)[0], config)
    clock = _StepClock(WARMUP_STEPS)
    wanted = WARMUP_STEPS + steps
    per_epoch = min(train_batches(len(train), trainer_cfg), wanted)  # small data: several short epochs
    with quiet_lightning(), tempfile.TemporaryDirectory(prefix="medseg-estimate-") as scratch:
        trainer = L.Trainer(
            accelerator=trainer_cfg.accelerator,
            devices=1,
            precision=precision(config),
            max_epochs=math.ceil(wanted / per_epoch),
            limit_train_batches=per_epoch,
            limit_val_batches=steps,
            gradient_clip_val=trainer_cfg.gradient_clip,
            callbacks=[clock],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            benchmark=uses_cuda(config),
            default_root_dir=scratch,
        )
        trainer.fit(module, datamodule=SegmentationDataModule(config, train, val))
    return clock.times()


class _StepClock(Callback):
    """Times each training step end to end (loading and augmenting its batch included) and each validation batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.train: list[float] = []
        self.val: list[float] = []
        self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = _now()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.train.append(self._lap())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = _now()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.val.append(self._lap())

    def _lap(self) -> float:
        now = _now()
        lap, self._last = now - self._last, now
        return lap

    def times(self) -> StepTimes:
        """The mean step and validation batch after the first (warm-up: kernels chosen or compiled), unless there was no other."""
        timed = self.train[self.warmup :] or self.train[:1]
        val = self.val[1:] or self.val
        return StepTimes(train_step=_mean(timed), val_batch=_mean(val), steps=len(timed))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _now() -> float:
    """The time, after the work queued on the GPU is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
