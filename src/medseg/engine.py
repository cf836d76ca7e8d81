"""The training engine: a LightningModule around an injected model, a LightningDataModule over decoded
frames, the callbacks that keep a run safe, and :func:`train`, which trains one run folder.

Frames and masks are decoded once, checked (:func:`medseg.datasets.read_sample`), and kept in memory as
``uint8``; DataLoader workers augment them and hand ``uint8`` batches over, which the module normalises
on the device. The optimiser, schedule, early stopping and checkpoints are the recipe's (DESIGN.md).
"""

from __future__ import annotations

import csv
import io as text_io
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset

from medseg import metrics, progress, runs, transforms
from medseg.config import Config
from medseg.datasets import DataOptions, Record, read_sample
from medseg.errors import DataError, FileError, MedsegError
from medseg.gpu_augment import BatchAugment
from medseg.io import atomic_write
from medseg.losses import create_loss
from medseg.models import EncoderWeights, create_model, split_outputs

GRAY_MEAN = 0.449
GRAY_STD = 0.226
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_score", "lr", "images_per_s", "epoch_seconds")


class NonFiniteLossError(MedsegError):
    """The loss became NaN or infinite; training stops and the last good checkpoint stays."""


Sample = tuple[np.ndarray, np.ndarray]


def load_samples(records: list[Record], options: DataOptions, workers: int | None = None) -> dict[str, Sample]:
    """Decode and check every labelled frame once, in threads.

    Args:
        records: Labelled records.
        options: How masks are read.
        workers: Reading threads; defaults to the CPU count.

    Returns:
        Frame (``uint8``) and mask (``uint8`` 0/1) by record id.

    Raises:
        DataError: If any sample cannot be used; says how many and shows the first.
    """

    def read(record: Record) -> Sample | FileError:
        try:
            image, mask = read_sample(record, options)
        except FileError as error:
            return error
        return image, mask.view(np.uint8)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(progress.track(pool.map(read, records), len(records), "reading frames"))
    failures = [result for result in results if isinstance(result, FileError)]
    if failures:
        raise DataError(f"{len(failures)} sample(s) cannot be used, first: {failures[0]}; `medseg inspect DATA` lists them all")
    return {record.id: result for record, result in zip(records, results)}


class SegmentationDataset(Dataset):
    """Augmented ``uint8`` tensors of cached samples.

    Each DataLoader worker reseeds its own copy of the pipeline so that workers do not repeat each
    other's augmentations.
    """

    def __init__(self, samples: list[Sample], transform, seed: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self._seeded_worker: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.samples[index]
        if self.transform is not None:
            self._reseed_for_worker()
            image, mask = transforms.apply(self.transform, image, mask)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.ascontiguousarray(mask))[None]

    def _reseed_for_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None or self._seeded_worker == info.id:
            return
        transforms.reseed(self.transform, (self.seed or 0) * 1000 + info.seed % 1000 + info.id)
        self._seeded_worker = info.id


class SegmentationDataModule(L.LightningDataModule):
    """Training and validation loaders over cached samples.

    Args:
        config: Run configuration (input size, augmentation, batch size, workers).
        train_samples: Training frames and masks.
        val_samples: Validation frames and masks.
    """

    def __init__(self, config: Config, train_samples: list[Sample], val_samples: list[Sample]) -> None:
        super().__init__()
        self.config = config
        self.train_samples = train_samples
        self.val_samples = val_samples

    def train_dataloader(self) -> DataLoader:
        batch = self.config.trainer.batch_size
        if augments_on_device(self.config):
            return self._loader(SegmentationDataset(self._same_size(self.train_samples), None), shuffle=True, drop_last=len(self.train_samples) > batch)
        dataset = SegmentationDataset(self.train_samples, transforms.train_transform(self.config, self.config.trainer.seed), self.config.trainer.seed)
        return self._loader(dataset, shuffle=True, drop_last=len(dataset) > batch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(SegmentationDataset(self.val_samples, transforms.eval_transform(self.config)), shuffle=False, drop_last=False)

    def _same_size(self, samples: list[Sample]) -> list[Sample]:
        """Frames as they are when they share one size (resized on the device), else resized here first."""
        if len({image.shape for image, _ in samples}) <= 1:
            return samples
        resize = transforms.eval_transform(self.config)
        return [transforms.apply(resize, image, mask) for image, mask in samples]

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        workers = num_workers(self.config)
        return DataLoader(
            dataset,
            batch_size=self.config.trainer.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )


def num_workers(config: Config) -> int:
    """DataLoader workers: the configured number, else one per spare core on a GPU and none on a CPU."""
    if config.trainer.num_workers is not None:
        return config.trainer.num_workers
    return max(0, min(15, (os.cpu_count() or 1) - 1)) if uses_cuda(config) else 0


def augments_on_device(config: Config) -> bool:
    """Whether training batches are augmented on the training device (``augment.backend``)."""
    backend = config.augment.backend
    return backend == "gpu" or (backend == "auto" and uses_cuda(config))


def uses_cuda(config: Config) -> bool:
    """Whether this run trains on a CUDA device."""
    return config.trainer.accelerator != "cpu" and torch.cuda.is_available()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 matrix maths in hardware (AVX512-BF16 or AMX tiles).

    On such a CPU bf16 autocast with channels-last trains the cpu preset about 2.3x faster than fp32
    (BENCHMARKS.md); elsewhere bf16 is emulated and slower, so ``auto`` keeps fp32 there.
    """
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)


def uses_channels_last(config: Config) -> bool:
    """``trainer.channels_last``; ``auto`` is on for CUDA and for a CPU with native bf16."""
    setting = config.trainer.channels_last
    if setting != "auto":
        return setting
    return uses_cuda(config) or cpu_has_native_bf16()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Gray frames (``uint8``, or float in [0, 1] from the batch augmentation) to the network's input."""
    scaled = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (scaled - GRAY_MEAN) / GRAY_STD


def default_masks(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The untuned decision (:func:`medseg.predict.default_postprocess`): pixels with probability >= 0.5,
    and, with a presence head, only in frames whose presence probability is above 0.5.

    Shape:
        Returns: (N, 1, H, W) bool.
    """
    logits, presence = split_outputs(outputs)
    masks = logits >= 0
    return masks if presence is None else masks & (presence > 0).reshape(-1, 1, 1, 1)


class SegmentationModule(L.LightningModule):
    """Trains an injected segmentation model on logits with the configured loss.

    Args:
        model: Maps (N, 1, H, W) float frames to (N, 1, H, W) logits.
        config: Run configuration (loss, optimiser, channels-last, compile).
    """

    def __init__(self, model: torch.nn.Module, config: Config) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.save_hyperparameters({"config": config.model_dump(mode="json")})
        self.loss_fn = create_loss(config.loss)
        self.channels_last = uses_channels_last(config)
        self.nonfinite_at: int | None = None
        object.__setattr__(self, "batch_augment", BatchAugment(config) if augments_on_device(config) else None)
        self._compiled = None
        self._reset_epoch_sums()

    def _reset_epoch_sums(self) -> None:
        self.train_loss_sum = 0.0
        self.train_images = 0
        self.val_counts: list[torch.Tensor] = []

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_augment is None or not self.trainer.training:
            return batch
        return self.batch_augment(*batch)

    def setup(self, stage: str) -> None:
        if self.batch_augment is not None and self.trainer is not None:
            self.batch_augment.manual_seed(self.config.trainer.seed * 1000 + self.trainer.global_rank)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.config.trainer.compile and self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self._compiled or self.model)(images)

    def _inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = batch
        images = normalise(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, (masks > 0).float()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, masks = self._inputs(batch)
        loss = self.loss_fn(self(images), masks)
        self._check_finite(loss, "training")
        self.train_loss_sum += float(loss.detach()) * len(images)
        self.train_images += len(images)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, masks = self._inputs(batch)
        outputs = self(images)
        loss = self.loss_fn(outputs, masks)
        self._check_finite(loss, "validation")
        self.log("val_loss", loss, on_epoch=True, batch_size=len(images), sync_dist=True, prog_bar=True)
        self.val_counts.append(metrics.confusion_counts_torch(default_masks(outputs), masks > 0.5))

    def on_validation_epoch_end(self) -> None:
        if not self.val_counts:
            return
        counts = torch.cat(self.val_counts)
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).reshape(-1, 3)
        self.log("val_score", metrics.competition_score(counts.cpu().numpy()), prog_bar=True, sync_dist=False)
        self.val_counts = []

    def on_train_epoch_start(self) -> None:
        self._reset_epoch_sums()

    def _check_finite(self, loss: torch.Tensor, phase: str) -> None:
        if not torch.isfinite(loss.detach()):
            self.nonfinite_at = self.current_epoch
            raise NonFiniteLossError(
                f"{phase} loss is {float(loss.detach())} at epoch {self.current_epoch + 1}; training stopped, the last good "
                "checkpoint is kept; lower optim.lr or set trainer.gradient_clip"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.config.optim
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        if optim.schedule == "cosine":
            epochs = self.config.trainer.max_epochs
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=optim.lr * optim.cosine_floor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=optim.plateau_factor, patience=optim.plateau_patience)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch"}}


class EpochMetricsWriter(Callback):
    """Writes one row per epoch to ``metrics.csv`` (atomically) after validation, before the epoch's
    checkpoint (which Lightning saves at the end of the training epoch).

    On resume, rows of epochs that will be trained again are dropped.

    Args:
        path: The CSV file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.epoch_start = 0.0
        self.train_seconds = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: SegmentationModule) -> None:
        if not self.rows and self.path.is_file():
            self.rows = [row for row in read_metrics(self.path) if int(row["epoch"]) < trainer.current_epoch + 1]
        self.epoch_start = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: SegmentationModule) -> None:
        self.train_seconds = time.perf_counter() - self.epoch_start

    def on_validation_end(self, trainer: L.Trainer, pl_module: SegmentationModule) -> None:
        if trainer.sanity_checking:
            return
        sums = trainer.strategy.reduce(torch.tensor([pl_module.train_loss_sum, pl_module.train_images], dtype=torch.float64), reduce_op="sum")
        loss_sum, images = (float(value) for value in sums)
        row = {
            "epoch": trainer.current_epoch + 1,
            "train_loss": loss_sum / images if images else math.nan,
            "val_loss": _metric(trainer, "val_loss"),
            "val_score": _metric(trainer, "val_score"),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "images_per_s": images / self.train_seconds if self.train_seconds else math.nan,
            "epoch_seconds": time.perf_counter() - self.epoch_start,
        }
        self.rows = [r for r in self.rows if int(r["epoch"]) != row["epoch"]] + [row]
        if trainer.is_global_zero:
            write_metrics(self.path, self.rows)


def _metric(trainer: L.Trainer, name: str) -> float:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else math.nan


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the per-epoch table atomically."""
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints to a temporary file and renames it, so no checkpoint on disk is ever partial.

    The checkpoint is serialised in memory first, so that a full disk surfaces as the ``OSError`` of the
    write (torch's zip writer would turn it into an unrelated ``RuntimeError``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = text_io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_write(Path(path), "wb") as stream:
            stream.write(buffer.getbuffer())


@dataclass(frozen=True)
class FoldResult:
    """How one (sub-)run ended.

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


def precision(config: Config) -> str:
    """Lightning precision: ``trainer.precision``; ``auto`` is bf16-mixed on a CUDA device or a CPU that
    supports bf16 natively, fp32 elsewhere."""
    if config.trainer.precision != "auto":
        return config.trainer.precision
    native_bf16 = torch.cuda.is_bf16_supported() if uses_cuda(config) else cpu_has_native_bf16()
    return "bf16-mixed" if native_bf16 else "32-true"


def build_trainer(config: Config, fold_dir: runs.FoldDir, show_progress: bool, extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    """A Lightning trainer with the recipe's callbacks writing into ``fold_dir``.

    ``last.ckpt`` has its own checkpoint callback because Lightning 2.6 writes ``save_last`` only in the
    epochs that also improve the monitored value, and resuming needs the latest epoch. ``best.ckpt`` holds
    the weights only (a third of the size: prediction, tuning and export need no optimiser state);
    ``last.ckpt`` keeps the optimiser and schedule for ``--resume``.
    """
    trainer_cfg = config.trainer
    best = ModelCheckpoint(
        dirpath=fold_dir.checkpoints, filename="best", monitor="val_loss", mode="min", save_top_k=1, save_weights_only=True, enable_version_counter=False
    )
    last = ModelCheckpoint(dirpath=fold_dir.checkpoints, filename="last", save_top_k=1, enable_version_counter=False)
    stopper = EarlyStopping("val_loss", patience=trainer_cfg.early_stopping_patience, mode="min")
    callbacks = [EpochMetricsWriter(fold_dir.metrics), stopper, best, last]
    if show_progress:
        callbacks.append(RichProgressBar())
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        precision=precision(config),
        max_epochs=trainer_cfg.max_epochs,
        gradient_clip_val=trainer_cfg.gradient_clip,
        limit_train_batches=trainer_cfg.limit_train_batches,
        limit_val_batches=trainer_cfg.limit_val_batches,
        callbacks=callbacks + list(extra_callbacks or []),
        logger=_tensorboard_logger(fold_dir),
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        benchmark=uses_cuda(config),
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
) -> tuple[FoldResult, EncoderWeights | None]:
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
    L.seed_everything(config.trainer.seed + fold_dir.fold, workers=True, verbose=False)
    model_cfg = config.model.model_copy(update={"encoder_weights": "none"}) if resume_from else config.model
    model, weights = create_model(model_cfg)
    module = SegmentationModule(model, config)
    data = SegmentationDataModule(config, [samples[i] for i in train_ids], [samples[i] for i in val_ids])
    with _quiet_lightning():
        trainer = build_trainer(config, fold_dir, show_progress, extra_callbacks)
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    result = _fold_result(trainer, fold_dir)
    if trainer.is_global_zero:
        runs.write_json(fold_dir.path / runs.DONE_FILE, asdict(result))
    return result, None if resume_from else weights


def _fold_result(trainer: L.Trainer, fold_dir: runs.FoldDir) -> FoldResult:
    rows = read_metrics(fold_dir.metrics) if fold_dir.metrics.is_file() else []
    best = min(rows, key=lambda row: float(row["val_loss"]), default=None)
    stopper = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    return FoldResult(
        fold=fold_dir.fold,
        epochs=len(rows),
        best_val_loss=float(best["val_loss"]) if best else math.nan,
        best_val_score=float(best["val_score"]) if best else math.nan,
        stopped_early=stopper.stopped_epoch > 0 and len(rows) < (trainer.max_epochs or 0),  # a stop on the last epoch ends nothing early
    )


class _quiet_lightning:
    """Silence Lightning's informational log lines and the warnings that do not concern the user."""

    def __enter__(self) -> None:
        self._level = logging.getLogger("lightning.pytorch").level
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(*exc)
        logging.getLogger("lightning.pytorch").setLevel(self._level)


def is_ddp_child() -> bool:
    """Whether this process is a worker that Lightning's DDP launcher started (not the one the user ran)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def show_progress_default() -> bool:
    """Progress bars only on an interactive terminal."""
    return sys.stderr.isatty()
