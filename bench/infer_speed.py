"""Inference speed: PyTorch eager against ONNX Runtime on the CPU, and the GPU path when there is one.

Same model (smp U-Net, random weights), same normalised batches, in one run; prints images/s of each side
and the ratio. CPU sizes: 128x160 with resnet18 (the ``cpu`` preset's size until 2026-12-02, 128x128 since)
and the recipe (448x608, resnet34). GPU (when CUDA is available): fp32 eager against bf16 + channels-last at
448x608, TTA off.

Usage: ``.venv/bin/python bench/infer_speed.py [--batch N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medseg.config import ModelConfig
from medseg.infer.export import EnsembleProbabilities, OnnxEnsemble, export_graph
from medseg.learn.models import create_model

CASES = (("cpu preset", "resnet18", 128, 160), ("recipe", "resnet34", 448, 608))


def rate(function, batch: torch.Tensor, repeats: int) -> float:
    """Images per second of ``function`` on ``batch``, best of ``repeats`` after one warm-up call."""
    function(batch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(batch)
        if batch.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def cpu_table(batch_size: int, repeats: int) -> None:
    """PyTorch eager against ONNX Runtime, both on the CPU threads of this machine."""
    print(f"CPU, {torch.get_num_threads()} torch threads, batch {batch_size}")
    print(f"{'case':<11} {'size':<8} {'torch img/s':>11} {'ORT img/s':>10} {'ratio':>6}")
    for name, encoder, height, width in CASES:
        model = EnsembleProbabilities([create_model(ModelConfig(encoder=encoder, encoder_weights="none"))[0]]).eval()
        batch = torch.rand(batch_size, 1, height, width)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            export_graph(model, batch[:1], path, 17)
            session = OnnxEnsemble(path)
            with torch.inference_mode():
                eager = rate(model, batch, repeats)
            ort = rate(session, batch, repeats)
        print(f"{name:<11} {height}x{width:<4} {eager:>11.1f} {ort:>10.1f} {ort / eager:>5.2f}x")


def gpu_table(batch_size: int, repeats: int) -> None:
    """fp32 eager against bf16 + channels-last at the recipe size on the GPU."""
    model = EnsembleProbabilities([create_model(ModelConfig(encoder="resnet34", encoder_weights="none"))[0]]).eval().cuda()
    batch = torch.rand(batch_size, 1, 448, 608, device="cuda")
    with torch.inference_mode():
        fp32 = rate(model, batch, repeats)
        fast_model = model.to(memory_format=torch.channels_last)
        fast_batch = batch.contiguous(memory_format=torch.channels_last)

        def fast(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fast_model(images)

        bf16 = rate(fast, fast_batch, repeats)
    print(f"GPU {torch.cuda.get_device_name(0)}, batch {batch_size}, 448x608, TTA off")
    print(f"fp32 eager {fp32:.0f} img/s, bf16 + channels-last {bf16:.0f} img/s, ratio {bf16 / fp32:.2f}x (target >= 2,000 img/s)")


def main() -> None:
    """Print the tables this machine can measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gpu-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpu_table(args.batch, args.repeats)
    if torch.cuda.is_available():
        gpu_table(args.gpu_batch, args.repeats)
    else:
        print("no CUDA device: GPU inference not measured")


if __name__ == "__main__":
    main()
