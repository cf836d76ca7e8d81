"""The LightningDataModule: training and validation loaders over decoded samples.

DataLoader workers augment the cached ``uint8`` samples with Albumentations (:mod:`medseg.data.transforms`)
and hand ``uint8`` batches over; when the run augments on the device, the training loader only batches
frames of one size and the module augments them after the transfer.
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medseg.config import Config
from medseg.data import transforms
from medseg.data.samples import Sample
from medseg.devices import augments_on_device, uses_cuda


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
        mask = torch.from_numpy(np.ascontiguousarray(mask))
        return torch.from_numpy(np.ascontiguousarray(image))[None], mask[None] if mask.dim() == 2 else mask

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
            return self._loader(
                SegmentationDataset(self._same_size(self.train_samples), None), shuffle=True, drop_last=len(self.train_samples) > batch
            )
        dataset = SegmentationDataset(
            self.train_samples, transforms.train_transform(self.config, self.config.trainer.seed), self.config.trainer.seed
        )
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
