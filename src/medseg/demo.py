"""``medseg demo``: the whole workflow on the bundled sample, in a few minutes on a laptop CPU.

inspect -> train (``cpu`` preset on a CPU, ``default`` on a GPU) -> tune -> predict a submission and
check it -> evaluate on the sample's held-out test frames (their true masks ship in ``test_truth.csv``)
-> the report.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from medseg import __version__
from medseg.config import load_config
from medseg.data.datasets import load_dataset, sample_data_path
from medseg.data.inspector import inspect_dataset
from medseg.errors import UsageError
from medseg.infer.outputs import PredictRequest, predict_folder
from medseg.infer.tune import TuneRequest, tune_run
from medseg.learn.train import TrainRequest, train_run
from medseg.report.evaluate import EvaluateRequest, evaluate_run
from medseg.report.page import ReportRequest, build_report
from medseg.runs import RUN_FILE, RUN_TREE, RunFile, RunPlan, check_replaceable, delete_ours

DEMO_FILE = "demo.json"
DEMO_TREE = {
    re.escape(DEMO_FILE): None,
    "run": RUN_TREE,
    r"submission\.csv": None,
    "holdout": {"images": {r"\d+\.tif": None}, r"truth\.csv": None},  # the sample's test frames, copied
    r"\..+\.tmp": None,
}

CPU_DEMO = [
    "trainer.max_epochs=30",
    "trainer.early_stopping_patience=10",
    "trainer.batch_size=8",
    "optim.lr=0.001",
    "model.encoder_weights=none",
]


def run_demo(out: Path, force: bool = False, on_message: Callable[[str], None] = print, with_report: bool = True) -> dict[str, Path]:
    """Run every stage on the bundled sample and return where each output is.

    Args:
        out: Folder for the demo's outputs.
        force: Replace an earlier demo in ``out``.
        with_report: End with ``RUN/report.html``.
        on_message: Receives one line per step.

    Raises:
        UsageError: If ``out`` holds files and ``force`` is not given.
    """
    out = Path(out)
    _replace_demo_folder(out, force)
    DemoFolder().write(out / DEMO_FILE)
    sample = sample_data_path()
    inspection = inspect_dataset(load_dataset(sample))
    on_message(
        f"1/5 inspect: {inspection.summary['train_images']} frames, {inspection.summary['subjects']} subjects, "
        f"{len(inspection.problems)} problems"
    )
    gpu = torch.cuda.is_available()
    config = load_config("default" if gpu else "cpu", overrides=[] if gpu else CPU_DEMO)
    on_message(f"2/5 train ({'default' if gpu else 'cpu'} preset, {config.input.height}x{config.input.width}, {config.model.encoder})")
    trained = train_run(TrainRequest(sample, out / "run", config), on_message=on_message)
    tuned = tune_run(TuneRequest(out / "run"), on_message=on_message, samples=trained.samples)
    presence = f", presence above {tuned.presence_threshold:.2f}" if tuned.presence_head else ""
    on_message(
        f"3/5 tune: threshold {tuned.threshold:.2f}, min area {tuned.min_area} px{presence}, validation score {tuned.score_after:.3f}"
    )
    predict_folder(PredictRequest(out / "run", sample / "test", out / "submission.csv", allow_degenerate=True), on_message=on_message)
    on_message(f"4/5 predict: {out / 'submission.csv'} (checked)")
    holdout = _holdout_folder(sample, out / "holdout")
    summary = evaluate_run(EvaluateRequest(out / "run", holdout), on_message=on_message)
    on_message(f"5/5 evaluate on {summary['n_images']} held-out frames: score {summary['score']:.3f}")
    report = build_report(ReportRequest(out / "run"), on_message=on_message, samples=trained.samples) if with_report else None
    outputs = {
        "run folder": out / "run",
        "metrics per epoch": out / "run" / "metrics.csv",
        "tuned post-processing": out / "run" / "postprocess.json",
        "submission": out / "submission.csv",
        "evaluation": Path(summary["out"]),
    }
    if report is not None:
        outputs["report"] = report
    return outputs


class DemoFolder(RunFile):
    """``demo.json``: marks a folder as the outputs of ``medseg demo``, the only folder ``demo --force`` replaces.

    Attributes:
        medseg: The medseg version that wrote it.
    """

    medseg: str = __version__


def _replace_demo_folder(out: Path, force: bool) -> None:
    """Create ``out``; with ``force`` first delete an earlier demo's outputs there, and only those.

    Raises:
        UsageError: If ``out`` holds files and ``force`` is not given, is not a demo folder, or holds files the
            demo did not write.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out}: exists and is not empty; use --force to replace the demo or --out for another folder")
        if (out / DEMO_FILE).is_file():
            check_replaceable(out, DEMO_TREE, DEMO_FILE, DemoFolder, "demo folder")
        elif _legacy_demo(out):
            check_replaceable(out, DEMO_TREE, f"run/{RUN_FILE}", RunPlan, "demo folder")
        else:
            raise UsageError(
                f"{out}: not a medseg demo folder (no {DEMO_FILE}), so --force will not delete anything in it; choose another --out"
            )
        delete_ours(out, DEMO_TREE)
    out.mkdir(parents=True, exist_ok=True)


def _legacy_demo(out: Path) -> bool:
    """Whether ``out`` is the outputs of a demo written before ``demo.json``: exactly its run, submission and held-out frames."""
    return {entry.name for entry in out.iterdir()} == {"run", "submission.csv", "holdout"} and (out / "run" / RUN_FILE).is_file()


def _holdout_folder(sample: Path, target: Path) -> Path:
    """The sample's test frames with their true masks, laid out as an rle-csv data folder."""
    (target / "images").mkdir(parents=True)
    for frame in (sample / "test").iterdir():
        shutil.copyfile(frame, target / "images" / frame.name)
    shutil.copyfile(sample / "test_truth.csv", target / "truth.csv")
    return target
