"""Prepare the folder `.gpu/` that one call of the device tool carries to a lent GPU machine.

The GPU machine has Python 3.12 with torch, Lightning, timm and ONNX Runtime, but none of medseg's other
dependencies, and it cannot reach the internet or `../shared`. This writes, in the checkout's `.gpu/`
(ignored by git):

- `wheels/`: the cp312 wheels of the missing packages (from PyPI, with pip download), at the versions
  this checkout's `.venv` runs. imagecodecs (26 MB) is left out: the frames below need only zlib.
- `data/uns-mini/`: the uns-mini training frames re-saved as deflate-compressed TIFF (lossless, the same
  pixels; tifffile reads them without imagecodecs) and `train_masks.csv` (no test frames: the benches
  train and score out-of-fold only).

Then, on the device: ``run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=560)``.

Usage: ``.venv/bin/python bench/gpu_prepare.py [--data-root ../shared/data]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import tifffile

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"
SHARED = ROOT.parent / "shared" / "data"
# Not on the GPU machine's image (the device tool's KINDS.md lists what is there).
MISSING = (
    "segmentation-models-pytorch",
    "albumentations",
    "albucore",
    "simsimd",
    "stringzilla",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT_MB = 64


def download_wheels(target: Path) -> None:
    """The cp312 wheels of :data:`MISSING`, at this environment's versions, into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in MISSING]
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    subprocess.run([*command, "--implementation", "cp", *platforms, "-d", str(target), *pins], check=True)


def copy_uns_mini(source: Path, target: Path) -> None:
    """The training frames of ``source`` as deflate TIFFs, and its ``train_masks.csv``, into ``target``."""
    (target / "train").mkdir(parents=True, exist_ok=True)
    frames = sorted(path for path in (source / "train").glob("*.tif") if not path.stem.endswith("_mask"))
    if not frames:
        sys.exit(f"error: {source / 'train'}: no frames; give the folder holding uns-mini with --data-root")
    for frame in frames:
        tifffile.imwrite(
            target / "train" / frame.name, tifffile.imread(frame), compression="zlib", compressionargs={"level": 9}, predictor=True
        )
    shutil.copy2(source / "train_masks.csv", target / "train_masks.csv")


def size_mb(folder: Path) -> float:
    """Megabytes of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def main() -> None:
    """Write `.gpu/` and say how large it is against the device tool's carry limit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=SHARED, help="folder holding uns-mini")
    args = parser.parse_args()
    shutil.rmtree(GPU, ignore_errors=True)
    download_wheels(GPU / "wheels")
    copy_uns_mini(args.data_root / "uns-mini", GPU / "data" / "uns-mini")
    print(
        f"{GPU}: {size_mb(GPU):.1f} MB (wheels {size_mb(GPU / 'wheels'):.1f}, data {size_mb(GPU / 'data'):.1f}); "
        f"the device tool carries {CARRY_LIMIT_MB} MB with the checkout"
    )


if __name__ == "__main__":
    main()
