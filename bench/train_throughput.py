"""Training throughput end to end: the recipe as written against medseg's engine, same model, data, batch.

- recipe: fp32 eager model, the Albumentations recipe pipeline in DataLoader workers (every core but one),
  batches moved as float.
- medseg: the engine's choices for this machine: on CUDA bf16 autocast, channels-last, optional
  ``torch.compile``, uint8 frames kept in memory, moved as uint8 into pinned memory and augmented as whole
  batches on the GPU (:mod:`medseg.data.gpu_augment`); on a CPU what the engine does there (Albumentations, and
  bf16 autocast with channels-last where the CPU has native bf16, else fp32).

Both run the same training step (0.5 Dice + 0.5 BCE, AdamW) on uns-mini frames for a fixed number of
steps after a warm-up (reported separately, compile included); images/s of each, the ratio, peak GPU
memory and the achieved TFLOP/s at 192 GFLOP per 448x608 training image (scaled by pixels for other sizes).

Usage: ``.venv/bin/python bench/train_throughput.py`` on a GPU machine (batch 32, 448x608, resnet34), or
``--cpu`` for small sizes on this machine (batch 8, 128x160, resnet18).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medseg.config import load_config
from medseg.data.datasets import load_dataset
from medseg.data.gpu_augment import BatchAugment
from medseg.data.intensity import normalise
from medseg.data.samples import load_samples
from medseg.data.transforms import train_transform
from medseg.devices import augments_on_device, precision, uses_channels_last, uses_cuda
from medseg.learn.datamodule import SegmentationDataset, num_workers
from medseg.learn.losses import create_loss
from medseg.learn.models import create_model

UNS_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uns-mini"
GFLOP_PER_IMAGE = 192.0
RECIPE_PIXELS = 448 * 608


def measure(step, batches, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds of the warm-up steps and images/s of the timed steps."""
    start = time.perf_counter()
    for images, masks in itertools.islice(batches, warmup):
        step(images, masks)
    _sync(device)
    warm = time.perf_counter() - start
    count, start = 0, time.perf_counter()
    for images, masks in itertools.islice(batches, steps):
        step(images, masks)
        count += len(images)
    _sync(device)
    return warm, count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forever(loader: DataLoader):
    """Batches of a loader, epoch after epoch."""
    while True:
        yield from loader


def recipe_side(config, samples, device: torch.device):
    """The recipe as written: fp32 eager, CPU augmentation in workers."""
    model = create_model(config.model)[0].to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    loss_fn = create_loss(config.loss)
    workers = max(1, (torch.multiprocessing.cpu_count() or 2) - 1)
    loader = DataLoader(
        SegmentationDataset(samples, train_transform(config, 0), 0),
        batch_size=config.trainer.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=True,
    )

    def step(images, masks):
        images, masks = normalise(images.to(device)), masks.to(device).float()
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, forever(loader)


def medseg_side(config, samples, device: torch.device):
    """The engine's fast path on this machine."""
    cuda = uses_cuda(config)
    channels_last, bf16 = uses_channels_last(config), precision(config) == "bf16-mixed"
    model = create_model(config.model)[0].to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if config.trainer.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    loss_fn = create_loss(config.loss)
    on_device = augments_on_device(config)
    augment = BatchAugment(config, seed=0) if on_device else None
    dataset = SegmentationDataset(samples, None if on_device else train_transform(config, 0), 0)
    workers = num_workers(config)
    loader = DataLoader(
        dataset,
        batch_size=config.trainer.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
    )

    def step(images, masks):
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        if augment is not None:
            images, masks = augment(images, masks)
        images = normalise(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(forward(images), (masks > 0).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, forever(loader)


def main() -> None:
    """Measure both sides and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small sizes for a machine without a GPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the medseg side")
    parser.add_argument("--data", type=Path, default=UNS_MINI, help="the uns-mini folder (Kaggle layout)")
    args = parser.parse_args()
    overrides = ["model.encoder_weights=none"]
    if args.cpu:
        overrides += ["input.height=128", "input.width=160", "model.encoder=resnet18", "trainer.batch_size=8", "trainer.accelerator=cpu"]
    config = load_config("default", overrides=overrides + (["trainer.compile=true"] if args.compile else []))
    steps, warmup = args.steps or (4 if args.cpu else 50), args.warmup or (1 if args.cpu else 10)
    device = torch.device("cuda") if uses_cuda(config) else torch.device("cpu")
    dataset = load_dataset(args.data)
    samples = list(load_samples(dataset.train, dataset.options).values())
    gflop = GFLOP_PER_IMAGE * config.input.height * config.input.width / RECIPE_PIXELS
    print(
        f"{device} {torch.cuda.get_device_name(0) if device.type == 'cuda' else ''}; "
        f"medseg side {precision(config)}, channels-last {uses_channels_last(config)}; "
        f"{config.model.encoder} {config.input.height}x{config.input.width}, batch {config.trainer.batch_size}, {steps} timed steps"
    )
    print(f"{'side':<8} {'warm-up s':>9} {'img/s':>8} {'TFLOP/s':>8} {'peak GPU GiB':>12}")
    rates = {}
    for name, build in (("recipe", recipe_side), ("medseg", medseg_side)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step, batches = build(config, samples, device)
        warm, rate = measure(step, batches, warmup, steps, device)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rates[name] = rate
        print(f"{name:<8} {warm:>9.1f} {rate:>8.1f} {rate * gflop / 1000:>8.2f} {memory:>12.2f}")
    print(f"ratio medseg / recipe: {rates['medseg'] / rates['recipe']:.2f}x (target on one H100: >= 800 img/s, >= 3.9x)")


if __name__ == "__main__":
    main()
