"""Run folders written before the kept predictions and the one code path for one or several structures read back
unchanged: their files (tests/data/old-runs, written by medseg at commit 75d4ceb: a one-structure uns-mini run and a
two-structure usgra-seg run, each tuned) are used as they are, and no command rewrites them.

The checkpoints are not kept in the repository (60 MB each): each test gives the run a fresh one of the run's
architecture, randomly initialised, which is all that reading the run needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medseg.cli import main
from medseg.config import read_run_config
from medseg.infer.predict import PostProcess, read_postprocess
from medseg.learn.models import create_model
from medseg.runs import KEPT_DIR, RunPlan, open_run

OLD_RUNS = Path(__file__).parent / "data" / "old-runs"
DATA = {"uns": "uns-mini", "usgra": "usgra-seg"}
WRITTEN_BEFORE = ("run.json", "config.yaml", "split.json", "postprocess.json", "versions.json", "data_summary.json", "frames.json")


def old_run(name: str, tmp_path: Path, shared_data: Path) -> Path:
    """A copy of an old run folder, its data folder pointed at this machine's, with a random checkpoint."""
    run = tmp_path / name
    shutil.copytree(OLD_RUNS / name, run)
    plan = json.loads((run / "run.json").read_text())
    plan["data"] = str((shared_data / DATA[name]).resolve())
    (run / "run.json").write_text(json.dumps(plan, indent=2) + "\n")
    config = read_run_config(run / "config.yaml")
    model, _ = create_model(config.model.model_copy(update={"encoder_weights": "none"}))
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {f"model.{key}": value for key, value in model.state_dict().items()}}, run / "checkpoints" / "best.ckpt")
    return run


def contents(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in WRITTEN_BEFORE}


@pytest.mark.parametrize("name", ["uns", "usgra"])
def test_an_old_run_reads_back_with_its_tuning(name, tmp_path, shared_data):
    run = open_run(old_run(name, tmp_path, shared_data))
    tuning = json.loads((run.path / "postprocess.json").read_text())
    blocks = list(tuning["classes"].values()) if "classes" in tuning else [tuning]
    expected = [PostProcess(block["threshold"], block["min_area"], block["presence_threshold"], tuned=True) for block in blocks]
    assert read_postprocess(run) == expected
    assert run.structures == len(blocks) == max(1, len(RunPlan.read(run.path / "run.json").classes))


@pytest.mark.parametrize("name", ["uns", "usgra"])
def test_report_evaluate_and_predict_use_an_old_run_without_rewriting_it(name, tmp_path, shared_data, capsys):
    run = old_run(name, tmp_path, shared_data)
    before = contents(run)
    flags = ["--classes", "nerve=1,vessel=2"] if name == "usgra" else []
    assert main(["report", str(run), "--quiet", "--no-tta"]) == 0
    assert main(["evaluate", str(run), str(shared_data / DATA[name]), "--quiet", "--no-tta", *flags]) == 0
    summary = json.loads(next((run / "evaluation").glob("*/summary.json")).read_text())
    tuning = json.loads((run / "postprocess.json").read_text())
    if name == "usgra":
        assert {key: value["threshold"] for key, value in summary["postprocess"].items()} == {
            key: value["threshold"] for key, value in tuning["classes"].items()
        }
    else:
        assert summary["postprocess"]["threshold"] == tuning["threshold"] and summary["postprocess"]["tuned"]
    out = tmp_path / "submission.csv"
    images = shared_data / DATA[name] / "test" if name == "uns" else tmp_path / "frames"
    if name == "usgra":
        images.mkdir()
        for frame in sorted((shared_data / DATA[name] / "images").iterdir())[:2]:
            shutil.copyfile(frame, images / frame.name)
    assert main(["predict", str(run), str(images), "--out", str(out), "--quiet", "--no-tta", "--allow-degenerate"]) == 0
    assert contents(run) == before
    assert sorted(path.name for path in (run / KEPT_DIR).iterdir()) == ["fold_0.none.npz"]
    capsys.readouterr()
