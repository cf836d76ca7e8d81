"""Noisy labels: `inspect --write-exclusions`, `train --exclude`, and what tune, evaluate and the report do with
the frames left out. Real data: the 69 original Kaggle frames of ``../shared/data/kaggle-uns-real``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_OVERRIDES, set_args
from medseg import runs
from medseg.cli import main
from medseg.data import exclusions
from medseg.data.datasets import Record, load_dataset
from medseg.data.inspector import Contradiction, inspect_dataset
from medseg.infer import heldout
from medseg.runs import open_run

LEFT_OUT = {"1_40", "1_9", "1_13", "1_25", "1_35"}  # the empty frame of each of the 5 contradicting pairs


def one_error_line(err: str, *named: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    base = ["train", str(data), "--out", str(run), "--preset", "cpu", "--folds", "2", "--quiet", "--no-report"]
    return [*base, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1", "trainer.limit_train_batches=1"), *extra]


@pytest.fixture(scope="module")
def real(shared_data) -> Path:
    return shared_data / "kaggle-uns-real"


@pytest.fixture(scope="module")
def written(real, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("exclusions") / "exclusions.csv"
    assert main(["inspect", str(real), "--write-exclusions", str(path)]) == 1  # the problems are still in the data
    return path


@pytest.fixture(scope="module")
def excluded_run(real, written, tmp_path_factory) -> Path:
    """Both folds of a tiny 2-fold run on kaggle-uns-real without the written exclusions, tuned, with its report."""
    from medseg.infer.tune import TuneRequest, tune_run
    from medseg.report.page import ReportRequest, build_report

    run = tmp_path_factory.mktemp("runs") / "excluded"
    assert main(train_args(real, run, "--exclude", str(written))) == 0
    tune_run(TuneRequest(run, tta="none"), on_message=lambda line: None)
    build_report(ReportRequest(run, tta="none"), on_message=lambda line: None)
    return run


def test_inspect_writes_the_empty_frame_of_each_contradicting_pair_with_its_reason(real, written, capsys):
    inspection = inspect_dataset(load_dataset(real))
    assert len({(item.first.id, item.second.id) for item in inspection.contradictions}) == 5
    lines = written.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# medseg exclusions") and lines[1].startswith("# rule: ") and lines[2] == "id,reason"
    rows = list(csv.DictReader(lines[2:]))
    assert {row["id"] for row in rows} == LEFT_OUT and len(rows) == 5
    for item in inspection.contradictions:
        empty, full = (item.first, item.second) if item.areas[0] == 0 else (item.second, item.first)
        reason = next(row["reason"] for row in rows if row["id"] == empty.id)
        assert f"near-duplicate {full.id} " in reason and f"{max(item.areas)} px" in reason and "no mask" in reason
    assert exclusions.read_exclusions(written) == {row["id"]: row["reason"] for row in rows}


def test_inspect_refuses_to_replace_the_file_without_force(real, tmp_path, capsys):
    path = tmp_path / "exclusions.csv"
    path.write_text("id\n1_40\n")
    assert main(["inspect", str(real), "--write-exclusions", str(path)]) == 2
    one_error_line(capsys.readouterr().err, str(path), "--force")
    assert path.read_text() == "id\n1_40\n"
    assert main(["inspect", str(real), "--json", "--write-exclusions", str(path), "--force"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"]["train_images"] == 69 and "5 frame(s)" in captured.err
    assert set(exclusions.read_exclusions(path)) == LEFT_OUT
    assert main(["inspect", str(real), "--force"]) == 2
    one_error_line(capsys.readouterr().err, "--force", "--write-exclusions")


def test_clean_data_writes_a_file_with_no_frames(shared_data, tmp_path, capsys):
    path = tmp_path / "none.csv"
    assert main(["inspect", str(shared_data / "uns-mini"), "--write-exclusions", str(path)]) == 0
    assert exclusions.read_exclusions(path) == {} and "0 frame(s)" in capsys.readouterr().out


def _record(frame: str) -> Record:
    return Record(frame, Path(f"{frame}.png"), subject="1")


def test_masks_that_disagree_leave_out_both_and_a_frame_is_listed_once_with_every_reason():
    a, b, c = _record("a"), _record("b"), _record("c")
    found = [
        Contradiction(a, b, 0.99, (500, 400), dice=0.2, structure="nerve"),
        Contradiction(a, b, 0.99, (0, 300), structure="vessel"),
        Contradiction(b, c, 0.985, (300, 0)),
    ]
    left_out = exclusions.leave_out(found)
    assert list(left_out) == ["a", "b", "c"]
    assert left_out["a"].count("; ") == 1 and left_out["a"].startswith("nerve: ") and "vessel: no mask" in left_out["a"]
    assert "Dice 0.20" in left_out["b"] and "near-duplicate a " in left_out["b"] and "vessel" not in left_out["b"]
    assert left_out["c"] == "no mask, but its near-duplicate b (similarity 0.985) has one of 300 px"


def test_a_hand_written_file_needs_only_ids(tmp_path):
    path = tmp_path / "by-hand.csv"
    path.write_text("\ufeff# my own list\nID\n\n1_40\n  # another comment\n1_9\n", encoding="utf-8")
    assert exclusions.read_exclusions(path) == {"1_40": "", "1_9": ""}


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("", "no header"),
        ("name,why\n1_40,x\n", "line 1"),
        ("id,reason\n1_40,a\n1_40,b\n", "line 3"),
        ("id,reason\n,empty\n", "no id"),
        ("id,reason\n1_40,one,two\n", "quote a reason"),
        (b"id\n\xff\xfe1_40\n", "UTF-8"),
        ('id,reason\n1_40,"never closed\n', "not a CSV"),
    ],
    ids=["empty", "header", "twice", "no-id", "cells", "binary", "quote"],
)
def test_a_malformed_file_is_one_line_and_trains_nothing(real, tmp_path, capsys, content, named):
    path = tmp_path / "bad.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    run = tmp_path / "run"
    assert main(train_args(real, run, "--exclude", str(path))) == 1
    one_error_line(capsys.readouterr().err, str(path), named)
    assert not run.exists()


def test_unknown_ids_and_a_missing_file_are_one_line(real, tmp_path, capsys):
    path = tmp_path / "other.csv"
    path.write_text("id,reason\n1_40,ok\n7_3,from another data set\n")
    run = tmp_path / "run"
    assert main(train_args(real, run, "--exclude", str(path))) == 1
    one_error_line(capsys.readouterr().err, str(path), "7_3", "--write-exclusions")
    assert main(train_args(real, run, "--set", f"data.exclude={tmp_path / 'missing.csv'}")) == 2
    one_error_line(capsys.readouterr().err, "missing.csv", "--write-exclusions")
    path.write_text("id\n" + "\n".join(record.id for record in load_dataset(real).train) + "\n")
    assert main(train_args(real, run, "--exclude", str(path))) == 1
    one_error_line(capsys.readouterr().err, str(path), "every labelled frame")
    assert not run.exists()


def test_the_left_out_frames_are_in_no_fold_and_the_run_records_them(excluded_run, written, real):
    split = runs.read_json(excluded_run / runs.SPLIT_FILE)
    in_folds = {frame for fold in split["folds"] for frame in fold}
    every = {record.id for record in load_dataset(real).train}
    assert in_folds == every - LEFT_OUT and not LEFT_OUT & set(split["info"]["subjects"])
    plan = runs.RunPlan.read(excluded_run / runs.RUN_FILE)
    assert plan.excluded == exclusions.read_exclusions(written) and list(plan.excluded) == list(exclusions.read_exclusions(written))
    assert yaml.safe_load((excluded_run / runs.CONFIG_FILE).read_text())["data"]["exclude"] == str(written)
    assert runs.read_json(excluded_run / runs.DATA_SUMMARY_FILE)["train_images"] == 64
    for fold in (0, 1):
        assert (excluded_run / f"fold_{fold}" / runs.DONE_FILE).is_file()


def test_tuning_leaves_them_out_and_evaluate_can_score_them_by_the_ensemble(excluded_run, real):
    run = open_run(excluded_run)
    records = load_dataset(real).train
    tuned = runs.Tuning.read(excluded_run / runs.POSTPROCESS_FILE)
    assert tuned.frames == 64 and tuned.out_of_fold
    groups = heldout.held_out_groups(run, records, out_of_fold=True)
    assert heldout.ENSEMBLE not in groups and not LEFT_OUT & {frame for ids in groups.values() for frame in ids}
    with_them = heldout.held_out_groups(run, records, out_of_fold=True, left_out=True)
    assert set(with_them[heldout.ENSEMBLE]) == LEFT_OUT


def test_the_report_lists_the_left_out_frames_and_why(excluded_run, written):
    page = (excluded_run / runs.REPORT_FILE).read_text(encoding="utf-8")
    assert '<section id="excluded"><h2>Left-out frames</h2>' in page and "64 (5 more left out of training" in page
    for frame, reason in exclusions.read_exclusions(written).items():
        assert f"<th>{frame}</th><td>{reason}</td>" in page
    assert "64 held-out frames" in page


def test_evaluate_scores_every_frame_unless_told_to_skip_the_left_out_ones(excluded_run, real, shared_data, tmp_path, capsys):
    out = tmp_path / "evaluation"
    base = ["evaluate", str(excluded_run), str(real), "--out", str(out), "--no-tta", "--quiet"]
    assert main(base) == 0
    assert "frames left out of training" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 69 and {row["id"] for row in rows if row["fold"] == ""} == LEFT_OUT
    summary = json.loads((out / "summary.json").read_text())
    assert summary["left_out"]["frames"] == 5 and summary["left_out"]["scored"] and summary["n_images"] == 69
    assert main([*base, "--skip-excluded", "--force"]) == 0
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 64 and not LEFT_OUT & {row["id"] for row in rows}
    assert json.loads((out / "summary.json").read_text())["left_out"]["scored"] is False
    capsys.readouterr()
    other = ["evaluate", str(excluded_run), str(shared_data / "uns-mini"), "--out", str(tmp_path / "o"), "--skip-excluded"]
    assert main(other) == 2
    one_error_line(capsys.readouterr().err, "--skip-excluded", "drop it")


def test_resume_keeps_the_exclusions_of_the_run(excluded_run, real, capsys):
    assert main(["train", str(real), "--out", str(excluded_run), "--resume", "--quiet", "--no-report"]) == 0
    assert len(runs.RunPlan.read(excluded_run / runs.RUN_FILE).excluded) == 5
    assert main(["train", str(real), "--out", str(excluded_run), "--resume", "--exclude", "x.csv"]) == 2
    one_error_line(capsys.readouterr().err, "--resume")


def test_a_run_saved_before_exclusions_reads_back_without_any(tmp_path):
    older = {"format": 1, "data": "/data", "n_folds": 5, "folds": [0], "several": False, "train_non_empty": 3, "medseg": "0.1.0"}
    (tmp_path / runs.RUN_FILE).write_text(json.dumps(older))
    assert runs.RunPlan.read(tmp_path / runs.RUN_FILE).excluded == {}
