"""The LightningDataModule: training and validation loaders over decoded samples.

DataLoader workers augment the cached ``uint8`` samples with Albumentations (:mod:`medseg.data.transforms`)
and hand ``uint8`` batches over; when the run augments on the device, the training loader only batches
frames of one size and the module augments them after the transfer.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medseg.config import Config
from medseg.data import transforms
from medseg.data.samples import Sample
from medseg.devices import augments_on_device, usable_cores, uses_cuda


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
        self.val_frames_here: int | None = None  # this rank's validation frames before the padding; None: all real

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
        dataset = SegmentationDataset(self.val_samples, transforms.eval_transform(self.config))
        ranks, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if ranks == 1:
            return self._loader(dataset, shuffle=False, drop_last=False, validation=True)
        sampler = EqualValidationSampler(dataset, ranks, rank)
        self.val_frames_here = sampler.real_samples
        return self._loader(dataset, shuffle=False, drop_last=False, validation=True, sampler=sampler)

    def _same_size(self, samples: list[Sample]) -> list[Sample]:
        """Frames as they are when they share one size (resized on the device), else resized here first."""
        if len({image.shape for image, _ in samples}) <= 1:
            return samples
        resize = transforms.eval_transform(self.config)
        return [transforms.apply(resize, image, mask) for image, mask in samples]

    def _loader(
        self, dataset: Dataset, shuffle: bool, drop_last: bool, validation: bool = False, sampler: DistributedSampler | None = None
    ) -> DataLoader:
        local_ranks = self.trainer.num_devices if self.trainer is not None else 1
        workers = num_workers(self.config, local_ranks, validation)
        return DataLoader(
            dataset,
            batch_size=self.config.trainer.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            worker_init_fn=one_thread_per_worker if workers else None,
        )


class EqualValidationSampler(DistributedSampler):
    """This rank's share of the validation frames, every rank the same number, the padding last and counted apart.

    DDP's forward syncs the model's buffers on every rank in every batch, so the ranks must run equal batches;
    :class:`~torch.utils.data.DistributedSampler` pads them by repeating frames, which the validation loss and score
    would then count twice. Here rank r takes positions r, r + R, ... of the frames in order; positions past the end
    repeat early frames, and :attr:`real_samples` says how many of this rank's frames come before them, so that the
    module leaves the padding out of its sums (:meth:`medseg.learn.module.SegmentationModule.validation_step`).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.real_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        frames = len(self.dataset)
        return iter(position % frames for position in range(self.rank, self.num_samples * self.num_replicas, self.num_replicas))


def num_workers(config: Config, local_ranks: int = 1, validation: bool = False) -> int:
    """DataLoader workers of one loader of one rank: the configured number, else sized from the usable cores.

    On a CPU none (the cores train). On a GPU the cores are shared among the machine's ranks, one left to each rank's
    own process: the training loader takes the rest (at most 15; at most 4 when augmentation runs on the GPU and the
    workers only batch frames), the validation loader, which only resizes, at most 2 of them.
    """
    if config.trainer.num_workers is not None:
        return config.trainer.num_workers
    if not uses_cuda(config):
        return 0
    spare = max(0, usable_cores() // max(1, local_ranks) - 1)
    limit = 2 if validation else 4 if augments_on_device(config) else 15
    return min(spare, limit)


def one_thread_per_worker(worker_id: int) -> None:
    """In each DataLoader worker: OpenCV on one thread (by default it starts one per core, in every worker)."""
    cv2.setNumThreads(1)
