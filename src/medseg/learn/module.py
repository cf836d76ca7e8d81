"""The LightningModule: trains an injected segmentation model on logits with the configured loss.

Batches arrive as ``uint8`` frames and masks; the module augments them on the device when the run does
(:mod:`medseg.data.gpu_augment`), normalises them (:mod:`medseg.data.intensity`), and logs the validation
loss and the competition score at the untuned setting.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from medseg.config import Config
from medseg.data.gpu_augment import BatchAugment
from medseg.data.intensity import normalise
from medseg.devices import augments_on_device, uses_channels_last
from medseg.errors import MedsegError
from medseg.learn import metrics
from medseg.learn.losses import create_loss
from medseg.learn.models import split_outputs


class NonFiniteLossError(MedsegError):
    """The loss became NaN or infinite; training stops, and the checkpoints of earlier epochs (if any) stay.

    :func:`medseg.learn.fit.fit_fold` words the whole line (which checkpoints exist, what to try).

    Attributes:
        phase: ``training`` or ``validation``.
        epoch: The epoch, from 0.
        step: Training steps done before it, from 0.
    """

    def __init__(self, message: str, phase: str = "training", epoch: int = 0, step: int = 0) -> None:
        super().__init__(message)
        self.phase = phase
        self.epoch = epoch
        self.step = step


def default_masks(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The untuned decision (:func:`medseg.infer.predict.default_postprocess`): pixels with probability >= 0.5,
    and, with a presence head, only in frames whose presence probability is above 0.5.

    Shape:
        Returns: (N, C, H, W) bool, one channel per structure.
    """
    logits, presence = split_outputs(outputs)
    masks = logits >= 0
    return masks if presence is None else masks & (presence > 0).reshape(masks.shape[0], -1, 1, 1)


class SegmentationModule(L.LightningModule):
    """Trains an injected segmentation model on logits with the configured loss.

    The validation score is the competition score at the untuned setting: the mean Dice over every
    (frame, structure) pair, an empty prediction on an empty truth scoring 1.

    Args:
        model: Maps (N, 1, H, W) float frames to (N, C, H, W) logits, one channel per structure.
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
        self.val_counts.append(metrics.confusion_counts_torch(default_masks(outputs).flatten(0, 1), (masks > 0.5).flatten(0, 1)))

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
            epoch, step = self.current_epoch, self.global_step
            where = f"at epoch {epoch + 1}, step {step + 1}" if phase == "training" else f"at epoch {epoch + 1}"
            raise NonFiniteLossError(f"{phase} loss is {float(loss.detach())} {where}", phase, epoch, step)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.config.optim
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        if optim.schedule == "cosine":
            epochs = self.config.trainer.max_epochs
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=optim.lr * optim.cosine_floor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=optim.plateau_factor, patience=optim.plateau_patience
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch"}}
