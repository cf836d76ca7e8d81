"""Where and how a run computes: CUDA or the CPU, the precision, the memory layout, the augmentation backend.

Training (:mod:`medseg.learn`) and inference (:mod:`medseg.infer`) make the same choices from the same
configuration; neither needs the other to know them.
"""

from __future__ import annotations

import torch

from medseg.config import Config


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


def precision(config: Config) -> str:
    """Lightning precision: ``trainer.precision``; ``auto`` is bf16-mixed on a CUDA device or a CPU that
    supports bf16 natively, fp32 elsewhere."""
    if config.trainer.precision != "auto":
        return config.trainer.precision
    native_bf16 = torch.cuda.is_bf16_supported() if uses_cuda(config) else cpu_has_native_bf16()
    return "bf16-mixed" if native_bf16 else "32-true"


def augments_on_device(config: Config) -> bool:
    """Whether training batches are augmented on the training device (``augment.backend``)."""
    backend = config.augment.backend
    return backend == "gpu" or (backend == "auto" and uses_cuda(config))


def device_for(config: Config) -> torch.device:
    """CUDA when the run may use it and it is there, else the CPU."""
    return torch.device("cuda") if uses_cuda(config) else torch.device("cpu")
