"""The run folder: typed run files, and checkpoints that are loaded without running code from them.

A run folder may come from anyone (a shared model, a Kaggle dataset): loading it must never execute what
its pickles ask for, and a damaged file must be one line that names it and says what to do.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from importlib import metadata

import pytest
import torch

from medseg import runs
from medseg.cli import main
from medseg.data.datasets import sample_data_path


class WritesMarker:
    """Pickles into a call of ``Path.write_text``: loading the pickle with ``weights_only=False`` writes the marker."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "this ran code from a checkpoint"))


def malicious_checkpoint(path: pathlib.Path, marker: pathlib.Path) -> None:
    """A checkpoint that looks like Lightning's but whose state dict runs code when unpickled."""
    torch.save({"state_dict": WritesMarker(marker), "epoch": 0}, path)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_the_malicious_checkpoint_would_run_code_if_loaded_unsafely(tmp_path):
    """The test's own check: the file it plants is a real attack on ``weights_only=False``."""
    marker = tmp_path / "marker.txt"
    malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.is_file()


@pytest.mark.parametrize("command", ["predict", "export", "tune", "evaluate", "report"])
def test_a_checkpoint_that_would_run_code_is_refused(run_copy, tmp_path, shared_data, capsys, command):
    marker = tmp_path / "marker.txt"
    malicious_checkpoint(run_copy / "checkpoints" / "best.ckpt", marker)
    code = main(stage_args(command, run_copy, tmp_path, shared_data))
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert not marker.exists(), "loading the run ran code from its checkpoint"
    assert str(run_copy / "checkpoints" / "best.ckpt") in line and "refused" in line and "retrain that fold" in line, line


@pytest.mark.parametrize("command", ["predict", "export", "tune", "evaluate", "report"])
def test_a_truncated_best_checkpoint_is_one_line_naming_it(run_copy, tmp_path, shared_data, capsys, command):
    best = run_copy / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 3])
    code = main(stage_args(command, run_copy, tmp_path, shared_data))
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"error: {best}: cannot be read, truncated or corrupt" in line, line
    assert "--resume" in line and str(runs.DONE_FILE) in line, line


def stage_args(command: str, run: pathlib.Path, tmp_path: pathlib.Path, shared_data: pathlib.Path) -> list[str]:
    """The command line of one stage that loads the run's checkpoints."""
    quiet = ["--quiet"]
    return {
        "predict": ["predict", str(run), str(shared_data / "uns-mini" / "test"), "--out", str(tmp_path / "s.csv"), *quiet],
        "export": ["export", str(run), "--onnx", str(tmp_path / "m.onnx")],
        "tune": ["tune", str(run), "--force", "--no-report", *quiet],
        "evaluate": ["evaluate", str(run), str(shared_data / "uns-mini"), "--out", str(tmp_path / "evaluation"), *quiet],
        "report": ["report", str(run), *quiet],
    }[command]


def test_resume_refuses_a_last_checkpoint_that_would_run_code(tiny_sample_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_sample_run, run)  # a run trained on the sample
    (run / runs.DONE_FILE).unlink()  # as if the run had been killed after its checkpoint
    marker = tmp_path / "marker.txt"
    malicious_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    capsys.readouterr()
    code = main(["train", str(sample_data_path()), "--out", str(run), "--resume", "--quiet", "--no-report"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and not marker.exists()
    assert str(run / "checkpoints" / "last.ckpt") in line and "refused" in line and "--resume" in line, line


def test_run_files_are_typed_and_read_back(run_copy):
    run = runs.open_run(run_copy)
    assert run.plan == runs.RunPlan.read(run_copy / runs.RUN_FILE)
    assert run.plan.folds == [0] and not run.plan.several and run.plan.train_non_empty > 0
    versions = run.versions()
    assert versions.package("torch") == metadata.version("torch") and versions.encoder_weights.used == "random"
    result = run.folds[0].result()
    assert result.epochs == 2 and result.fold == 0
    assert run.tuning() is None


def test_a_run_saved_before_the_typed_files_reads_back(run_copy):
    """Files without the ``format`` key (every run before it was written) are format 1."""
    for name, added in ((runs.RUN_FILE, ("format", "medseg")), (runs.VERSIONS_FILE, ("format",)), (runs.DONE_FILE, ("format",))):
        content = json.loads((run_copy / name).read_text())
        for key in added:
            del content[key]
        (run_copy / name).write_text(json.dumps(content))
    run = runs.open_run(run_copy)
    assert run.plan.medseg is None and run.folds[0].result().epochs == 2 and run.versions().python


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"format": 2, "classes": ["nerve", "vessel"]}, "written by a newer medseg (run-file format 2; this one reads 1); upgrade medseg"),
        ({"folds": "zero"}, "not a valid RunPlan file (folds: Input should be a valid list); the run folder is damaged"),
        ({"colour": "blue"}, "not a valid RunPlan file (colour: Extra inputs are not permitted)"),
    ],
)
def test_a_newer_or_broken_run_file_is_one_line(run_copy, capsys, change, expected):
    path = run_copy / runs.RUN_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    code = main(["export", str(run_copy), "--onnx", str(run_copy / "m.onnx")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"error: {path}: {expected}" in line, line


def test_a_run_folder_without_run_json_says_how_to_make_one(tmp_path, capsys):
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    code = main(["tune", str(tmp_path)])
    assert code == 2 and "not a medseg run folder" in one_error_line(capsys.readouterr().err)
