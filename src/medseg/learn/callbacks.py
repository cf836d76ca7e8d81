"""Lightning callbacks and plugins that keep a run safe: the per-epoch metrics table, atomic checkpoints,
and quiet logs.
"""

from __future__ import annotations

import io as byte_io
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medseg import runs
from medseg.files import atomic_write


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

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.rows and self.path.is_file():
            self.rows = [row for row in runs.read_metrics(self.path) if int(row["epoch"]) < trainer.current_epoch + 1]
        self.epoch_start = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the epoch's steps are queued, not done, until the device says so
        self.train_seconds = time.perf_counter() - self.epoch_start

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # on the module's device: NCCL, the process group of DDP on CUDA, reduces no CPU tensor
        loss_sum, images = (float(value) for value in trainer.strategy.reduce(pl_module.train_sums(), reduce_op="sum"))
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
            runs.write_metrics(self.path, self.rows)


def _metric(trainer: L.Trainer, name: str) -> float:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else math.nan


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints to a temporary file and renames it, so no checkpoint on disk is ever partial, and
    reads them back without running code from them.

    The checkpoint is serialised in memory first, so that a full disk surfaces as the ``OSError`` of the
    write (torch's zip writer would turn it into an unrelated ``RuntimeError``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = byte_io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_write(Path(path), "wb") as stream:
            stream.write(buffer.getbuffer())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint to resume from with ``weights_only=True``, whatever Lightning asks: no code runs.

        Raises:
            CheckpointError: If it is truncated, corrupt or holds more than weights and plain values.
        """
        fix = "delete it to restart that fold from its first epoch with --resume, or train the run again with --force"
        return runs.read_checkpoint(Path(path), fix)


class quiet_lightning:
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
        # val_loss and val_score are logged already summed over the ranks (SegmentationModule.on_validation_epoch_end)
        warnings.filterwarnings("ignore", message=".*sync_dist=True.*when logging on epoch level.*")

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(*exc)
        logging.getLogger("lightning.pytorch").setLevel(self._level)
