"""The run folder: where a training run keeps everything needed to reproduce and reuse it.

```
RUN/
  run.json        data folder, data options, folds trained, medseg version
  config.yaml     the resolved configuration
  split.json      the subject-grouped folds
  versions.json   python, torch, smp, lightning, CUDA, GPU; encoder weights used and why
  data_summary.json  frames, empty share, subjects, sizes, mask areas of the training data
  checkpoints/    best.ckpt (weights at the lowest validation loss), last.ckpt (for --resume)  (single run)
  metrics.csv     one row per epoch                                      (single run)
  fold_K/         checkpoints/, metrics.csv, done.json per fold            (--folds N)
```
A single run keeps its files at the top; ``done.json`` marks a finished (sub-)run so that ``--resume``
skips it. Nothing is overwritten without ``--force``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.errors import UsageError
from medseg.io import atomic_write

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
VERSIONS_FILE = "versions.json"
DATA_SUMMARY_FILE = "data_summary.json"
METRICS_FILE = "metrics.csv"
DONE_FILE = "done.json"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
_PACKAGES = ("torch", "torchvision", "segmentation-models-pytorch", "lightning", "albumentations", "numpy", "timm")


@dataclass(frozen=True)
class FoldDir:
    """Where one (sub-)run of a run folder keeps its files.

    Attributes:
        fold: The validation fold.
        path: ``RUN`` for a single run, ``RUN/fold_K`` for one of several folds.
    """

    fold: int
    path: Path

    @property
    def checkpoints(self) -> Path:
        """The checkpoint folder."""
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        """The checkpoint written at the end of every epoch."""
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        """The checkpoint with the lowest validation loss."""
        return self.checkpoints / BEST

    @property
    def metrics(self) -> Path:
        """The per-epoch metrics table."""
        return self.path / METRICS_FILE

    @property
    def done(self) -> bool:
        """Whether this (sub-)run finished."""
        return (self.path / DONE_FILE).is_file()


def fold_dirs(run: Path, folds: list[int], several: bool) -> list[FoldDir]:
    """The (sub-)run folders of a run: ``RUN`` itself, or ``RUN/fold_K`` for each fold."""
    return [FoldDir(fold, Path(run) / f"fold_{fold}" if several else Path(run)) for fold in folds]


def check_run_folder(run: Path, force: bool, resume: bool) -> None:
    """Check, without changing anything, that a run may be written into ``run``.

    Args:
        run: The run folder.
        force: Replace an existing run folder.
        resume: Continue the run in ``run``.

    Raises:
        UsageError: If ``run`` holds files and neither flag allows using it, if ``--force`` would delete
            a folder that is not a medseg run, or if ``--resume`` finds no run to continue.
    """
    run = Path(run)
    if resume and force:
        raise UsageError("--resume and --force exclude each other: --resume continues RUN, --force replaces it")
    if run.exists() and not run.is_dir():
        raise UsageError(f"{run}: exists and is not a folder; choose another --out")
    occupied = run.is_dir() and any(run.iterdir())
    if resume:
        if not (run / RUN_FILE).is_file():
            raise UsageError(f"{run}: no run to resume ({RUN_FILE} missing); start it without --resume")
        return
    if occupied and not force:
        raise UsageError(f"{run}: folder exists and is not empty; use --force to replace the run or --resume to continue it")
    if occupied and not (run / RUN_FILE).is_file() and not (run / CONFIG_FILE).is_file():
        raise UsageError(f"{run}: not a medseg run folder, so --force will not delete it; choose another --out")


def replace_run_folder(run: Path, force: bool) -> None:
    """Check again that a new run may be written into ``run`` (:func:`check_run_folder`), then create it.

    With ``force`` an earlier run in ``run`` is deleted: call this only once the new run's data has
    loaded, so that a mistyped data folder does not cost the old run.

    Raises:
        UsageError: As :func:`check_run_folder`.
    """
    run = Path(run)
    check_run_folder(run, force=force, resume=False)
    if run.is_dir() and any(run.iterdir()):
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically, readable by people (indented)."""
    with atomic_write(path) as stream:
        json.dump(content, stream, indent=2, default=str)
        stream.write("\n")


def read_json(path: Path) -> Any:
    """Read a JSON file of a run.

    Raises:
        UsageError: If it is missing or not JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: not found; is this a medseg run folder?") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({error}); the run folder is damaged") from error


def versions() -> dict[str, Any]:
    """Versions of Python, medseg and the libraries that decide the numbers, and the accelerator."""
    import torch

    found = {"python": sys.version.split()[0], "platform": platform.platform(), "medseg": __version__}
    for package in _PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["cuda"] = torch.version.cuda
    found["cuda_available"] = torch.cuda.is_available()
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    found["cpu_count"] = os.cpu_count()
    return found


def installation_versions() -> dict[str, str]:
    """Python, the platform, and the installed version of every dependency medseg declares (not its extras)."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for requirement in metadata.requires("medseg") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    import torch

    found["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
    return found
