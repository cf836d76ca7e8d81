"""Hostile and careless outputs: ``--force`` replaces only what medseg wrote, every output is checked before the
first byte, names stay inside their folder, training frames are recognised by content, and a damaged run file is
one line (issue 31).

Each class is tried where the user meets it: the installed console script for a few, ``main`` in-process for the
rest (the same code, without a second interpreter start), and a property test where the fix is a check.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg import runs
from medseg.cli import main
from medseg.errors import MedsegError, UsageError
from medseg.files import (
    NAME_RULE,
    Output,
    OutputExistsError,
    atomic_write,
    check_name,
    check_outputs,
    inside,
    safe_file_name,
    spreadsheet_safe,
)
from medseg.infer import outputs

SCRIPT = shutil.which("medseg", path=str(Path(sys.executable).parent))


def medseg(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script."""
    assert SCRIPT is not None, f"no medseg console script beside {sys.executable}"
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, check=False, timeout=300)


def one_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The one ``error:`` line of a finished command, checked: its exit code, no traceback, the words."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


def error_line(capsys) -> str:
    """The ``error:`` line an in-process command printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def tree(folder: Path) -> set[str]:
    """Every path under ``folder``, relative, hidden ones too."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# --force replaces only what medseg wrote


def test_train_force_refuses_a_folder_that_merely_holds_a_config_yaml(tmp_path, shared_data):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "config.yaml").write_text("a: 1\n")
    (thesis / "chapter1.tex").write_text("my thesis\n")
    result = medseg("train", shared_data / "uns-mini", "--out", thesis, "--force", "--preset", "cpu", "--quiet")
    one_error(result, 2, str(thesis), "not a medseg run folder", "run.json")
    assert tree(thesis) == {"config.yaml", "chapter1.tex"}


def test_train_force_refuses_a_run_folder_holding_someone_elses_file(run_copy, shared_data, capsys):
    (run_copy / "notes.txt").write_text("keep me\n")
    (run_copy / "checkpoints" / "my_weights.pt").write_text("mine\n")
    before = tree(run_copy)
    code = main(["train", str(shared_data / "uns-mini"), "--out", str(run_copy), "--force", "--preset", "cpu", "--quiet"])
    assert code == 2
    line = error_line(capsys)
    assert "2 file(s) medseg did not write" in line and "notes.txt" in line
    assert tree(run_copy) == before


def test_replacing_a_run_deletes_exactly_its_own_files(run_copy):
    (run_copy / "evaluation" / "other").mkdir(parents=True)
    (run_copy / "evaluation" / "other" / "summary.json").write_text("{}\n")
    (run_copy / "report").mkdir()
    (run_copy / "report" / "tuning.png").write_bytes(b"png")
    (run_copy / ".config.yaml.abc.tmp").write_text("left by a killed write")
    runs.replace_run_folder(run_copy, force=True)
    assert run_copy.is_dir() and tree(run_copy) == set()


def test_a_run_stopped_before_its_configuration_was_written_is_started_again_with_force(run_copy):
    for entry in run_copy.iterdir():  # what a run killed just after writing run.json holds
        if entry.name != "run.json":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    with pytest.raises(UsageError, match=r"config.yaml missing \(the run was stopped .*start the run again with --force"):
        runs.check_run_folder(run_copy, force=False, resume=True)
    runs.replace_run_folder(run_copy, force=True)
    assert run_copy.is_dir() and not any(run_copy.iterdir())


def test_a_run_folder_with_a_link_is_not_replaced(run_copy, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("irreplaceable\n")
    (run_copy / "report").symlink_to(precious)
    with pytest.raises(UsageError, match="medseg did not write .*report"):
        runs.check_run_folder(run_copy, force=True, resume=False)
    assert (precious / "data.txt").is_file()


def test_demo_force_refuses_a_folder_that_merely_holds_a_run_folder(tmp_path, capsys):
    folder = tmp_path / "v"
    (folder / "run").mkdir(parents=True)
    (folder / "keep.txt").write_text("mine\n")
    assert main(["demo", "--out", str(folder), "--force", "--quiet"]) == 2
    assert "not a medseg demo folder" in error_line(capsys)
    assert tree(folder) == {"run", "keep.txt"}


def test_demo_force_refuses_a_demo_folder_with_a_foreign_file(tmp_path, run_copy, capsys):
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "demo.json").write_text('{"format": 1, "medseg": "0"}\n')
    shutil.copytree(run_copy, folder / "run")
    (folder / "run" / "thesis.docx").write_text("mine\n")
    assert main(["demo", "--out", str(folder), "--force", "--quiet"]) == 2
    assert "run/thesis.docx" in error_line(capsys)
    assert (folder / "run" / "thesis.docx").is_file() and (folder / "run" / "run.json").is_file()


@pytest.mark.parametrize("marker", [True, False], ids=["demo.json", "written-before-demo.json"])
def test_demo_force_replaces_exactly_an_earlier_demo(tmp_path, run_copy, marker):
    from medseg import demo

    folder = tmp_path / "demo"
    folder.mkdir()
    if marker:
        demo.DemoFolder().write(folder / demo.DEMO_FILE)
    shutil.copytree(run_copy, folder / "run")
    (folder / "submission.csv").write_text("img,pixels\n1,\n")
    (folder / "holdout" / "images").mkdir(parents=True)
    (folder / "holdout" / "images" / "1.tif").write_bytes(b"frame")
    (folder / "holdout" / "truth.csv").write_text("img,pixels\n")
    demo._replace_demo_folder(folder, force=True)
    assert folder.is_dir() and tree(folder) == set()


# every output checked before the first byte


def test_the_same_path_for_two_outputs_is_refused_before_predicting(run_copy, shared_data, tmp_path):
    target = tmp_path / "x"
    result = medseg("predict", run_copy, shared_data / "uns-mini" / "test", "--out", target, "--masks-dir", target)
    one_error(result, 2, "--out and --masks-dir both name")
    assert not target.exists()


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(lambda run, data, tmp: ["--out", str(tmp / "s.csv"), "--save-probs"], id="save-probs-exists"),
        pytest.param(lambda run, data, tmp: ["--out", str(run / "config.yaml"), "--force"], id="out-is-a-run-file"),
        pytest.param(lambda run, data, tmp: ["--masks-dir", str(data), "--force"], id="masks-dir-is-the-frames"),
        pytest.param(lambda run, data, tmp: ["--out", str(tmp / "m" / "s.csv"), "--masks-dir", str(tmp / "m")], id="out-inside-masks"),
    ],
)
def test_outputs_that_would_lose_data_are_refused_before_anything_is_written(run_copy, shared_data, tmp_path, capsys, make_args):
    frames = tmp_path / "frames"
    shutil.copytree(shared_data / "uns-mini" / "test", frames)
    (tmp_path / "s.csv.probs.npz").write_bytes(b"earlier probabilities")
    before = {
        path: path.read_bytes() for path in [*run_copy.rglob("*"), *tmp_path.rglob("*")] if path.is_file() and path.stat().st_size < 10**6
    }
    code = main(["predict", str(run_copy), str(frames), "--allow-degenerate", *make_args(run_copy, frames, tmp_path)])
    assert code == 2, capsys.readouterr()
    error_line(capsys)
    assert all(path.read_bytes() == content for path, content in before.items())
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "m").exists()


def test_export_refuses_to_write_its_settings_over_the_model(run_copy, tmp_path, capsys):
    assert main(["export", str(run_copy), "--onnx", str(tmp_path / "m.json")]) == 2
    assert "the same file" in error_line(capsys)
    assert not (tmp_path / "m.json").exists()


def test_of_two_writers_of_one_new_file_only_the_first_succeeds(tmp_path):
    path = tmp_path / "submission.csv"
    with pytest.raises(OutputExistsError, match="appeared while medseg was writing it"), atomic_write(path, exclusive=True) as stream:
        stream.write("second writer\n")
        path.write_text("first writer\n")  # the other process finishes first
    assert path.read_text() == "first writer\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["submission.csv"]


def test_check_outputs_refuses_a_folder_for_a_file_and_a_file_inside_an_output_folder(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="is a folder; give a file name"):
        check_outputs([Output("--out", tmp_path / "dir")], force=True)
    with pytest.raises(UsageError, match="lies inside --masks-dir"):
        check_outputs([Output("--masks-dir", tmp_path / "m", folder=True), Output("--out", tmp_path / "m" / "a.csv")], force=False)


# a masks folder: exactly the new outputs


def test_a_masks_folder_rerun_with_force_holds_exactly_the_new_masks(run_copy, shared_data, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("1.tif", "2.tif", "3.tif"):
        shutil.copyfile(shared_data / "uns-mini" / "test" / name, frames / name)
    masks = tmp_path / "masks"
    args = ["predict", str(run_copy), str(frames), "--masks-dir", str(masks), "--allow-degenerate", "--quiet"]
    assert main(args) == 0
    assert tree(masks) == {".medseg-masks.json", "1.png", "2.png", "3.png"}
    (frames / "3.tif").unlink()
    killed = tmp_path / ".masks.medseg-partial-999999999-abc"  # what a killed write leaves: a process id that runs no more
    killed.mkdir()
    outputs.MasksFolder(run=str(run_copy), files=["1.png", "2.png"]).write(killed / outputs.MASKS_MARKER)  # its marker comes first
    (killed / "1.png").write_bytes(b"partial")
    lookalike = tmp_path / ".masks.medseg-old-999999999-xyz"  # named like medseg's, but no marker: not medseg's to delete
    lookalike.mkdir()
    (lookalike / "mine.png").write_bytes(b"a user's")
    assert main([*args, "--force", "--save-probs"]) == 0
    assert tree(masks) == {".medseg-masks.json", "1.png", "2.png", "probs.npz"}  # 3.png of the earlier run is gone
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [lookalike.name, "frames", "masks", "run"]  # the killed write's is gone
    assert (lookalike / "mine.png").read_bytes() == b"a user's"


def test_a_masks_folder_medseg_did_not_write_is_not_replaced(run_copy, shared_data, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "my_annotation.png").write_bytes(b"hours of work")
    code = main(["predict", str(run_copy), str(shared_data / "uns-mini" / "test"), "--masks-dir", str(masks), "--force", "--quiet"])
    assert code == 2
    assert "not a masks folder medseg wrote" in error_line(capsys)
    assert tree(masks) == {"my_annotation.png"}


def test_a_failed_masks_write_leaves_no_partial_folder(run_copy, shared_data, tmp_path, monkeypatch):
    calls = []

    def failing_png(mask, scale=255):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return b"png"

    monkeypatch.setattr(outputs, "mask_png", failing_png)
    masks = tmp_path / "masks"
    request = outputs.PredictRequest(run_copy, shared_data / "uns-mini" / "test", masks_dir=masks, allow_degenerate=True)
    with pytest.raises(OSError):
        outputs.predict_folder(request, on_message=lambda line: None)
    assert [entry.name for entry in tmp_path.iterdir()] == ["run"]


# names that become paths stay inside their folder


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_a_name_is_accepted_only_when_it_stays_inside_the_folder(tmp_path_factory, name):
    folder = tmp_path_factory.getbasetemp() / "names"
    try:
        check_name(name, "class", "run.json")
    except UsageError as error:
        assert NAME_RULE in str(error)
        return
    path = inside(folder, name)
    assert path.parent == folder and "/" not in name and name not in (".", "..")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3))
def test_inside_never_returns_a_path_outside_the_folder(tmp_path_factory, parts):
    folder = tmp_path_factory.getbasetemp() / "inside"
    try:
        path = inside(folder, *parts)
    except (MedsegError, ValueError):  # ValueError: a NUL byte, which no path may hold
        return
    assert path.resolve().is_relative_to(folder.resolve()) and path.resolve() != folder.resolve()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_a_frame_id_always_makes_a_safe_file_name(text):
    name = safe_file_name(text)
    assert check_name(name, "file", "test") == name


def test_inside_refuses_traversal_and_absolute_names(tmp_path):
    for name in ("../x", "../../etc/passwd", "/etc/passwd", "a/../../b", ".."):
        with pytest.raises(MedsegError, match="outside the folder"):
            inside(tmp_path, name)


# silently wrong results


@pytest.fixture(scope="module")
def evaluated_copy(tiny_uns_run, tmp_path_factory, shared_data):
    """A copy of the tiny run's training data at another path."""
    copy = tmp_path_factory.mktemp("copy") / "uns-copy"
    shutil.copytree(shared_data / "uns-mini", copy)
    return copy


def test_evaluate_on_a_copy_of_the_training_data_scores_it_out_of_fold(run_copy, evaluated_copy, tmp_path, capsys):
    assert (run_copy / runs.FRAMES_FILE).is_file()
    assert main(["evaluate", str(run_copy), str(evaluated_copy), "--out", str(tmp_path / "e"), "--no-tta"]) == 0
    out = capsys.readouterr().out
    assert "out-of-fold" in out
    with open(tmp_path / "e" / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["fold"] != "" for row in rows)  # each frame by its own fold's model


def test_evaluate_refuses_training_frames_under_other_names(run_copy, shared_data, tmp_path, capsys):
    data = tmp_path / "renamed"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for sample_id in ("1_1", "1_2", "2_1"):
        shutil.copyfile(shared_data / "uns-mini" / "train" / f"{sample_id}.tif", data / "images" / f"scan{sample_id}.tif")
        shutil.copyfile(shared_data / "uns-mini" / "train" / f"{sample_id}_mask.tif", data / "masks" / f"scan{sample_id}.tif")
    assert main(["evaluate", str(run_copy), str(data), "--out", str(tmp_path / "e"), "--no-tta"]) == 2
    line = error_line(capsys)
    assert "3 of 3 frames are frames" in line and "trained or validated on" in line
    assert not (tmp_path / "e").exists()


def test_spreadsheet_formulas_are_neutralised_but_numbers_kept():
    assert spreadsheet_safe('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert [spreadsheet_safe(value) for value in ("+1", "-cmd", "@SUM(A1)", "1_1")] == ["'+1", "'-cmd", "'@SUM(A1)", "1_1"]
    assert spreadsheet_safe(-0.5) == -0.5 and spreadsheet_safe(3) == 3


def test_per_image_csv_cells_are_neutralised(tmp_path):
    from medseg.report import evaluate

    rows = [{"id": "=cmd|' /C calc'!A0", "fold": "", "truth_area": 0, "pred_area": 0, "dice": 1.0, "iou": 1.0}]
    rows[0] |= {"truth_empty": True, "pred_empty": True}
    evaluate._write(tmp_path, rows, {}, evaluate.PER_IMAGE_COLUMNS)
    with open(tmp_path / evaluate.PER_IMAGE_FILE, newline="") as handle:
        assert next(csv.DictReader(handle))["id"] == "'=cmd|' /C calc'!A0"


# tracebacks where one line is promised


@pytest.mark.parametrize("damage", ["text", "link-to-file", "link-to-folder"])
def test_a_best_checkpoint_that_is_no_checkpoint_is_one_line(run_copy, shared_data, tmp_path, capsys, damage):
    best = run_copy / "checkpoints" / "best.ckpt"
    best.unlink()
    if damage == "text":
        best.write_text("hello\n")
    else:
        target = tmp_path / "passwd" if damage == "link-to-file" else tmp_path
        if damage == "link-to-file":
            target.write_text("root:x:0:0:root:/root:/bin/bash\n")
        best.symlink_to(target)
    code = main(["predict", str(run_copy), str(shared_data / "uns-mini" / "test"), "--out", str(tmp_path / "s.csv"), "--quiet"])
    assert code in (1, 2)
    assert str(best) in error_line(capsys)
    assert not (tmp_path / "s.csv").exists()


def test_a_frame_whose_name_is_not_utf8_is_refused_before_predicting(run_copy, shared_data, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copyfile(shared_data / "uns-mini" / "test" / "1.tif", frames / "1.tif")
    shutil.copyfile(shared_data / "uns-mini" / "test" / "2.tif", os.fsencode(frames) + b"/scan\xff.tif")
    result = medseg("predict", run_copy, frames, "--out", tmp_path / "s.csv")
    one_error(result, 2, "cannot be a frame id", "UTF-8", "rename the file")
    assert not (tmp_path / "s.csv").exists()
