"""The LightningModule: trains an injected segmentation model on logits with the configured loss.

Batches arrive as ``uint8`` frames and masks; the module augments them on the device when the run does
(:mod:`medseg.data.gpu_augment`), normalises them (:mod:`medseg.data.intensity`), and logs the validation
loss and the competition score at the untuned setting.

A training step never waits for the device: the epoch's loss sum and the first step whose loss was not finite stay
device tensors. Whether a loss failed is read on every process together (one collective, so that all stop at the
same step instead of the others waiting in the gradient all-reduce): after each of the first :data:`FIRST_STEPS`
steps, every :data:`CHECK_EVERY` steps, and before each validation, so that no checkpoint is written from weights a
failed loss touched. Validation under DDP counts each frame once: the sampler pads the ranks to equal batches (DDP
needs them) and the padded frames are left out of the sums (:class:`medseg.learn.datamodule.EqualValidationSampler`).
"""

from __future__ import annotations

import math
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

FIRST_STEPS = 10  # a loss that is not finite within this many training steps points at the data as much as at the settings
CHECK_EVERY = 50  # training steps between two checks of the loss after the first ones (each check waits for the device)


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


def _first(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], count: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` frames of a model's outputs (logits, and presence logits when there is a head)."""
    if isinstance(outputs, tuple):
        return tuple(part[:count] for part in outputs)
    return outputs[:count]


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
        object.__setattr__(self, "batch_augment", BatchAugment(config) if augments_on_device(config) else None)
        self._compiled = None
        self._reset_epoch_sums()

    def _zero(self) -> torch.Tensor:
        """A scalar sum on the module's device (float64 where the device has it)."""
        return torch.zeros((), dtype=torch.float32 if self.device.type == "mps" else torch.float64, device=self.device)

    def _reset_epoch_sums(self) -> None:
        self.train_loss_sum = self._zero()
        self.train_images = 0
        self.first_bad_step = self._zero() + math.inf  # the first training step whose loss was not finite; inf: none
        self.first_bad_loss = self._zero()
        self.val_loss_sum = self._zero()
        self.val_frames = 0
        self.val_counts: list[torch.Tensor] = []

    def train_sums(self) -> torch.Tensor:
        """The epoch's training loss sum (over frames) and frame count, on the module's device, for a sum over ranks."""
        return torch.stack([self.train_loss_sum, torch.full_like(self.train_loss_sum, self.train_images)])

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
        detached = loss.detach().to(self.train_loss_sum.dtype)
        self.train_loss_sum = self.train_loss_sum + detached * len(images)
        self.train_images += len(images)
        first = ~torch.isfinite(detached) & torch.isinf(self.first_bad_step)
        self.first_bad_step = torch.where(first, torch.full_like(self.first_bad_step, self.global_step), self.first_bad_step)
        self.first_bad_loss = torch.where(first, detached, self.first_bad_loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step <= FIRST_STEPS or self.global_step % CHECK_EVERY == 0:
            self._stop_if_training_loss_failed()

    def on_train_epoch_end(self) -> None:
        self._stop_if_training_loss_failed()

    def _stop_if_training_loss_failed(self) -> None:
        """Raise on every process when any process had a training loss that was not finite (one collective)."""
        first = float(self.trainer.strategy.reduce(self.first_bad_step.clone(), reduce_op="min"))
        if math.isinf(first):
            return
        here = float(self.first_bad_step) == first
        value = f"{float(self.first_bad_loss)}" if here else "not finite on another process"
        epoch, step = self.current_epoch, int(first)
        raise NonFiniteLossError(f"training loss is {value} at epoch {epoch + 1}, step {step + 1}", "training", epoch, step)

    def on_validation_epoch_start(self) -> None:
        self._stop_if_training_loss_failed()
        self.val_loss_sum = self._zero()
        self.val_frames = 0
        self.val_counts = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, masks = self._inputs(batch)
        outputs = self(images)  # every frame, padding included: DDP's forward syncs buffers on every rank
        real = self._real_frames(batch_idx, len(images))
        if real == 0:
            return
        outputs, masks = _first(outputs, real), masks[:real]
        loss = self.loss_fn(outputs, masks).detach().to(self.val_loss_sum.dtype)
        self.val_loss_sum = self.val_loss_sum + loss * real
        self.val_frames += real
        self.val_counts.append(metrics.confusion_counts_torch(default_masks(outputs).flatten(0, 1), (masks > 0.5).flatten(0, 1)))

    def _real_frames(self, batch_idx: int, size: int) -> int:
        """How many frames of this validation batch are the data set's, not the sampler's padding (which comes last)."""
        here = getattr(self.trainer.datamodule, "val_frames_here", None)
        if here is None:
            return size
        return max(0, min(size, here - batch_idx * self.config.trainer.batch_size))

    def on_validation_epoch_end(self) -> None:
        counts = torch.cat(self.val_counts).cpu().numpy() if self.val_counts else None
        pairs = 0 if counts is None else len(counts)
        dice_sum = metrics.competition_score(counts) * pairs if pairs else 0.0
        zero = self.val_loss_sum
        local = torch.stack([zero, torch.full_like(zero, self.val_frames), torch.full_like(zero, dice_sum), torch.full_like(zero, pairs)])
        loss_sum, frames, dice_total, pair_total = (float(value) for value in self.trainer.strategy.reduce(local, reduce_op="sum"))
        self.val_counts = []
        if not frames:
            return
        val_loss = loss_sum / frames
        if not math.isfinite(val_loss):
            epoch = self.current_epoch
            raise NonFiniteLossError(f"validation loss is {val_loss} at epoch {epoch + 1}", "validation", epoch, self.global_step)
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=False)  # summed over the ranks already
        self.log("val_score", dice_total / pair_total if pair_total else math.nan, prog_bar=True, sync_dist=False)

    def on_train_epoch_start(self) -> None:
        self._reset_epoch_sums()

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
