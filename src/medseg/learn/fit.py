"""Training one (sub-)run: a Lightning trainer with the recipe's callbacks, writing into its fold folder.

The optimiser, schedule, early stopping and checkpoints are the recipe's (DESIGN.md); :func:`fit_fold`
resumes from the fold's last checkpoint when there is one. :func:`check_trainer` builds the same trainer up
front, writing nothing, so that settings Lightning refuses stop a run (and ``--dry-run``) before its first file.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.strategies import StrategyRegistry

from medseg import progress, runs
from medseg.config import SEED_MAX, Config
from medseg.data.samples import Sample
from medseg.devices import precision, uses_cuda
from medseg.errors import UsageError
from medseg.learn.callbacks import AtomicCheckpointIO, EpochMetricsWriter, quiet_lightning
from medseg.learn.datamodule import SegmentationDataModule
from medseg.learn.models import create_model
from medseg.learn.module import FIRST_STEPS, NonFiniteLossError, SegmentationModule
from medseg.ranks import is_rank_zero

# What Lightning raises for settings it refuses while building a trainer (a missing package for a strategy included).
_REFUSALS = (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError)


def trainer_settings(config: Config) -> dict[str, Any]:
    """The arguments of Lightning's ``Trainer`` that come from the configuration (``trainer.*``, the precision)."""
    trainer_cfg = config.trainer
    return {
        "accelerator": trainer_cfg.accelerator,
        "devices": trainer_cfg.devices,
        "num_nodes": trainer_cfg.num_nodes,
        "strategy": trainer_cfg.strategy,
        "precision": precision(config),
        "max_epochs": trainer_cfg.max_epochs,
        "gradient_clip_val": trainer_cfg.gradient_clip,
        "limit_train_batches": trainer_cfg.limit_train_batches,
        "limit_val_batches": trainer_cfg.limit_val_batches,
        "benchmark": uses_cuda(config),
    }


def check_trainer(config: Config) -> None:
    """Refuse trainer settings Lightning would refuse when training starts, before anything is written.

    The strategy must be one of Lightning's (``auto`` or a name of its ``StrategyRegistry``); then a trainer is built
    with the run's settings and no logger or checkpoints, as :func:`build_trainer` builds it, and dropped: the
    device count, the accelerator, the strategy's needs (a GPU, a package) and the precision are checked as the
    run will meet them. :func:`medseg.learn.train.train_run` and ``--dry-run`` both call it before they write.

    Raises:
        UsageError: Naming the ``trainer.*`` keys and Lightning's reason.
    """
    trainer_cfg = config.trainer
    known = {"auto", *StrategyRegistry.available_strategies()}
    if trainer_cfg.strategy not in known:
        names = ", ".join(sorted(name for name in known if "find_unused" not in name))
        raise UsageError(
            f"trainer.strategy={trainer_cfg.strategy!r} (--strategy) is not a Lightning strategy; use one of {names} "
            "(the ddp ones also with _find_unused_parameters_true or _false)"
        )
    try:
        with quiet_lightning(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the run's own trainer gives them
            L.Trainer(
                **trainer_settings(config), logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
            )
    except _REFUSALS as error:
        settings = ", ".join(f"trainer.{key}={getattr(trainer_cfg, key)!r}" for key in ("accelerator", "devices", "num_nodes", "strategy"))
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:240].rstrip(".")
        fix = "change them with --set (or --devices, --strategy)"
        raise UsageError(f"Lightning refuses {settings} with precision {precision(config)!r}: {reason}; {fix}") from None


def build_trainer(config: Config, fold_dir: runs.FoldDir, show_progress: bool, extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    """A Lightning trainer with the recipe's callbacks writing into ``fold_dir``.

    ``last.ckpt`` has its own checkpoint callback because Lightning 2.6 writes ``save_last`` only in the
    epochs that also improve the monitored value, and resuming needs the latest epoch. ``best.ckpt`` holds
    the weights only (a third of the size: prediction, tuning and export need no optimiser state);
    ``last.ckpt`` keeps the optimiser and schedule for ``--resume``. With ``show_progress`` the epoch has
    Lightning's bar, unless the command line shows its own (:func:`medseg.progress.active`); without it
    Lightning writes no bar at all (none of its carriage returns into logs).
    """
    best = ModelCheckpoint(
        dirpath=fold_dir.checkpoints,
        filename="best",
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(dirpath=fold_dir.checkpoints, filename="last", save_top_k=1, enable_version_counter=False)
    stopper = EarlyStopping("val_loss", patience=config.trainer.early_stopping_patience, mode="min")
    callbacks = [EpochMetricsWriter(fold_dir.metrics), stopper, best, last]
    lightning_bar = show_progress and not progress.active()  # the command line's own bars replace Lightning's (RunProgress)
    if lightning_bar:
        callbacks.append(RichProgressBar())
    return L.Trainer(
        **trainer_settings(config),
        callbacks=callbacks + list(extra_callbacks or []),
        logger=_tensorboard_logger(fold_dir),
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=lightning_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=fold_dir.path,
    )


def _tensorboard_logger(fold_dir: runs.FoldDir):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(fold_dir.path, name="tensorboard")


def fit_fold(
    config: Config,
    fold_dir: runs.FoldDir,
    samples: dict[str, Sample],
    train_ids: list[str],
    val_ids: list[str],
    show_progress: bool = False,
    extra_callbacks: list[Callback] | None = None,
) -> tuple[runs.FoldResult, runs.EncoderWeights | None]:
    """Train one (sub-)run, resuming from its last checkpoint when there is one.

    Args:
        config: Run configuration.
        fold_dir: Where the checkpoints and metrics go.
        samples: Cached frames and masks by id.
        train_ids: Training ids.
        val_ids: Validation ids.
        show_progress: Show a progress bar with ETA.
        extra_callbacks: More Lightning callbacks (tests use them to interrupt a run).

    Returns:
        How it ended, and which encoder weights the model started from (``None`` when it resumed from a
        checkpoint, whose weights replace the encoder's).
    """
    if fold_dir.checkpoints.is_dir() and not is_ddp_child():
        for stale in fold_dir.checkpoints.glob(".*.tmp"):
            stale.unlink()
    resume_from = fold_dir.last if fold_dir.last.is_file() else None
    L.seed_everything((config.trainer.seed + fold_dir.fold) % (SEED_MAX + 1), workers=True, verbose=False)
    model_cfg = config.model.model_copy(update={"encoder_weights": "none"}) if resume_from else config.model
    model, weights = create_model(model_cfg)
    module = SegmentationModule(model, config)
    data = SegmentationDataModule(config, [samples[i] for i in train_ids], [samples[i] for i in val_ids])
    with quiet_lightning():
        trainer = build_trainer(config, fold_dir, show_progress, extra_callbacks)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume_from)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(nonfinite_message(error, fold_dir, config)) from None
    result = _fold_result(trainer, fold_dir)
    if trainer.is_global_zero:
        result.write(fold_dir.done_file)
    return result, None if resume_from else weights


def nonfinite_message(error: NonFiniteLossError, fold_dir: runs.FoldDir, config: Config) -> str:
    """The line for a loss that stopped being finite: where, which checkpoints exist (if any), and what to try.

    A loss that is not finite within the first :data:`FIRST_STEPS` training steps (or at the first validation)
    points at the data (frames that decode to inf or NaN) as much as at the learning rate.
    """
    early = error.step < FIRST_STEPS if error.phase == "training" else error.epoch == 0
    hints = ["the data may hold non-finite values (`medseg inspect DATA` lists them)"] if early else []
    hints.append(f"lower optim.lr (now {config.optim.lr:g}) or set trainer.gradient_clip")
    return f"{fold_dir.path}: {error}; training stopped; {_kept(fold_dir)}; {', or '.join(hints)}"


def _kept(fold_dir: runs.FoldDir) -> str:
    """Which checkpoints of the fold exist, in words (a failed run may have none)."""
    kept = [
        f"{path} ({what})"
        for path, what in ((fold_dir.best, "lowest validation loss"), (fold_dir.last, "end of the last epoch"))
        if path.is_file()
    ]
    if not kept:
        return "no checkpoint is kept (none was written before the loss failed)"
    return f"kept: {' and '.join(kept)}"


def _fold_result(trainer: L.Trainer, fold_dir: runs.FoldDir) -> runs.FoldResult:
    rows = runs.read_metrics(fold_dir.metrics) if fold_dir.metrics.is_file() else []
    best = min(rows, key=lambda row: float(row["val_loss"]), default=None)
    stopper = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    return runs.FoldResult(
        fold=fold_dir.fold,
        epochs=len(rows),
        best_val_loss=float(best["val_loss"]) if best else math.nan,
        best_val_score=float(best["val_score"]) if best else math.nan,
        stopped_early=stopper.stopped_epoch > 0 and len(rows) < (trainer.max_epochs or 0),  # a stop on the last epoch ends nothing early
    )


def is_ddp_child() -> bool:
    """Whether this process is another rank than global rank 0 of a distributed run (:func:`medseg.ranks.is_rank_zero`:
    torchrun, SLURM, Lightning's own launcher): it trains, but neither checks nor writes the run folder's own files."""
    return not is_rank_zero()


def show_progress_default() -> bool:
    """Progress bars only on an interactive terminal."""
    return sys.stderr.isatty()
