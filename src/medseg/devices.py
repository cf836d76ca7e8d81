"""Where and how a run computes: CUDA or the CPU, the precision, the memory layout, the augmentation backend.

Training (:mod:`medseg.learn`) and inference (:mod:`medseg.infer`) make the same choices from the same
configuration; neither needs the other to know them.
"""

from __future__ import annotations

import os

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


# Compute capabilities with fast fp16 but no native bf16 below 7.0: the P100 (6.0) and Jetson TX2 (6.2); the 6.1 cards
# (GTX 10x0, P4, P40) run fp16 at a fraction of fp32's speed.
_FAST_FP16_PASCAL = ((6, 0), (6, 2))


def cuda_capability(device: torch.device | int = 0) -> tuple[int, int]:
    """The compute capability of a CUDA card (the first visible one by default), e.g. (7, 5) for a T4, (8, 0) for an A100."""
    return tuple(torch.cuda.get_device_capability(device))


def card_precision(capability: tuple[int, int]) -> str:
    """The mixed precision a CUDA card of this compute capability trains fastest in without emulation.

    ``bf16-mixed`` from 8.0 (A100, A10, L4, H100: bf16 in hardware); ``16-mixed`` (fp16 with loss scaling) on cards
    with fast fp16 but no native bf16 (7.x: V100, T4, Kaggle's free pair of T4s; 6.0: P100, Kaggle's other free
    card); ``32-true`` below (fp16 and bf16 there are emulated or slow). ``torch.cuda.is_bf16_supported()`` is not
    used: it counts emulated bf16, which trains a T4 slower than fp32.
    """
    if capability >= (8, 0):
        return "bf16-mixed"
    if capability >= (7, 0) or capability in _FAST_FP16_PASCAL:
        return "16-mixed"
    return "32-true"


def precision(config: Config) -> str:
    """Lightning precision: ``trainer.precision``; ``auto`` is the card's (:func:`card_precision`) on CUDA,
    bf16-mixed on a CPU that supports bf16 natively, fp32 elsewhere."""
    if config.trainer.precision != "auto":
        return config.trainer.precision
    if uses_cuda(config):
        return card_precision(cuda_capability())
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def precision_reason(config: Config) -> str:
    """Why the run trains in :func:`precision`, in words (``--dry-run`` prints it)."""
    chosen = precision(config)
    if config.trainer.precision != "auto":
        return f"{chosen} (trainer.precision)"
    if uses_cuda(config):
        major, minor = cuda_capability()
        why = {
            "bf16-mixed": "bf16 in hardware",
            "16-mixed": "no native bf16: fp16 with loss scaling",
            "32-true": "no fast fp16 or bf16",
        }[chosen]
        return f"{chosen} (auto: compute capability {major}.{minor}, {why})"
    return f"{chosen} (auto: {'native bf16' if chosen == 'bf16-mixed' else 'no native bf16'} on this CPU)"


def inference_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type models predict in on ``device`` (the card's training precision), ``None`` for fp32."""
    if device.type != "cuda":
        return None
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(card_precision(cuda_capability(device)))


def idle_gpus_note(config: Config) -> str | None:
    """A note when the run trains on one CUDA card (the default) while the machine has more, else ``None``.

    One device is the default because DDP changes the run: N processes train N times the batch per step at the same
    learning rate. It is what ``--devices N --strategy ddp`` asks for.
    """
    count = torch.cuda.device_count() if uses_cuda(config) else 0
    if count < 2 or config.trainer.devices != 1 or config.trainer.num_nodes != 1:
        return None
    return (
        f"{count} CUDA devices here, and the run trains on one (trainer.devices=1); --devices {count} --strategy ddp "
        f"trains on all of them, with {count}x the batch per step at the same learning rate"
    )


def augments_on_device(config: Config) -> bool:
    """Whether training batches are augmented on the training device (``augment.backend``)."""
    backend = config.augment.backend
    return backend == "gpu" or (backend == "auto" and uses_cuda(config))


def device_for(config: Config) -> torch.device:
    """CUDA when the run may use it and it is there, else the CPU."""
    return torch.device("cuda") if uses_cuda(config) else torch.device("cpu")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which container limits set), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
