"""The progress of a whole training run, not only of its epoch.

:class:`RunProgress` is one Lightning callback for every fold of a run. After each epoch it tells the folds
done, the epoch of the current fold, the fold's best validation score (the score of its best checkpoint, the
one with the lowest validation loss) and an ETA for the whole run from the measured epoch times: the most
epochs left times the mean epoch, an upper bound where early stopping may end folds sooner. On a terminal
(inside :func:`medseg.progress.shown`) it is a bar for the run and one for the current epoch; elsewhere one
plain line per epoch, so that logs and CI output stay readable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import Callback

from medseg import progress
from medseg.learn.callbacks import EpochMetricsWriter

__all__ = ["RunProgress", "run_line"]

UPPER_BOUND = "upper bound: early stopping may end sooner"


def run_line(done: int, folds: int, fold: int, epoch: int, max_epochs: int, best_score: float, eta: str) -> str:
    """The whole-run line, e.g. ``run: 0/2 folds done; fold 0 epoch 2/2, best score 0.4120; ETA 3.1 min``."""
    score = "-" if math.isnan(best_score) else f"{best_score:.4f}"
    return f"run: {done}/{folds} folds done; fold {fold} epoch {epoch}/{max_epochs}, best score {score}; ETA {eta}"


def eta_text(seconds: float, upper_bound: bool) -> str:
    """The ETA of the run, saying when it is an upper bound."""
    return progress.format_duration(seconds) + (f" ({UPPER_BOUND})" if upper_bound and seconds > 0 else "")


class RunProgress(Callback):
    """Folds done, epoch, best score and the run's ETA after every epoch: a line, or bars on a terminal.

    Call :meth:`begin_fold` before each fold's ``fit`` and :meth:`close` when the run ends. Only the
    process of global rank 0 reports.

    Args:
        folds: The folds the run trains (finished ones of a resumed run included).
        max_epochs: Epochs of a fold at most.
        may_stop_early: Whether early stopping can end a fold before ``max_epochs``.
        on_line: Receives the line of each epoch when no bars are shown.
    """

    def __init__(self, folds: int, max_epochs: int, may_stop_early: bool, on_line: Callable[[str], None]) -> None:
        self.folds = folds
        self.max_epochs = max_epochs
        self.may_stop_early = may_stop_early
        self.on_line = on_line
        self.fold = 0
        self.position = 0
        self.epoch_seconds: list[float] = []
        self._epoch_start = 0.0
        self._pending: int | None = None
        self._run_bar: progress.Bar | None = None
        self._epoch_bar: progress.Bar | None = None

    def begin_fold(self, fold: int, position: int) -> None:
        """The next ``fit`` trains ``fold``, the ``position``-th of the run's folds (0-based: the folds done before it)."""
        self.fold, self.position, self._pending = fold, position, None

    def close(self) -> None:
        """Take the bars off the display."""
        for bar in (self._epoch_bar, self._run_bar):
            if bar is not None:
                bar.close()
        self._epoch_bar = self._run_bar = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and progress.active() and self._run_bar is None:
            self._run_bar = progress.Bar(f"run: 0/{self.folds} folds done", total=self.folds * self.max_epochs)
            self._run_bar.update(completed=self.position * self.max_epochs, eta="after the first epoch")
            self._epoch_bar = progress.Bar("epoch", total=1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, finished=False)  # the epoch before ended and the fold goes on
        self._epoch_start = time.perf_counter()
        if self._epoch_bar is not None:
            self._epoch_bar.restart(trainer.num_training_batches, f"fold {self.fold} epoch {trainer.current_epoch + 1}/{self.max_epochs}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self._epoch_bar is not None:
            self._epoch_bar.advance()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Early stopping decides after this hook (Lightning calls the monitoring callbacks last): the epoch is
        # reported when the next one starts or when training ends, with whether the fold goes on.
        self._pending = trainer.current_epoch + 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, finished=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close()

    def _report(self, trainer: L.Trainer, finished: bool) -> None:
        epoch, self._pending = self._pending, None
        if epoch is None or not trainer.is_global_zero:
            return
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        finished = finished or epoch >= self.max_epochs
        left = (0 if finished else self.max_epochs - epoch) + (self.folds - self.position - 1) * self.max_epochs
        seconds = left * sum(self.epoch_seconds) / len(self.epoch_seconds)
        done = self.position + finished
        eta = eta_text(seconds, self.may_stop_early)
        score = best_score(trainer)
        if self._run_bar is None:
            self.on_line(run_line(done, self.folds, self.fold, epoch, self.max_epochs, score, eta))
            return
        description = f"run: {done}/{self.folds} folds, fold {self.fold} epoch {epoch}/{self.max_epochs}, best {score:.4f}"
        completed = self.position * self.max_epochs + (self.max_epochs if finished else epoch)
        self._run_bar.update(completed=completed, description=description, eta=eta.replace(f" ({UPPER_BOUND})", " at most"))


def best_score(trainer: L.Trainer) -> float:
    """The validation score of the fold's epoch with the lowest validation loss so far (``nan`` before any)."""
    writer = next((callback for callback in trainer.callbacks if isinstance(callback, EpochMetricsWriter)), None)
    rows = [row for row in (writer.rows if writer else []) if not math.isnan(float(row["val_loss"]))]
    best = min(rows, key=lambda row: float(row["val_loss"]), default=None)
    return float(best["val_score"]) if best else math.nan
