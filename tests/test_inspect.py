"""`medseg inspect` on the real data sets and on a broken copy, through the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import read_rows, write_rows
from medseg.cli import main
from medseg.data import rle
from medseg.data.datasets import DataOptions, load_dataset, sample_data_path
from medseg.data.inspector import contradicting_duplicates, examine_labelled, inspect_dataset


def inspect_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["inspect", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_uns_mini_is_clean(capsys, shared_data):
    code, report = inspect_json(capsys, str(shared_data / "uns-mini"))
    summary = report["summary"]
    assert code == 0 and report["problems"] == []
    assert (summary["train_images"], summary["non_empty"], summary["empty"]) == (253, 164, 89)
    assert summary["subjects"] == 25
    assert summary["test_images"] == 53 and summary["sample_submission_rows"] == 53
    assert summary["image_sizes"] == {"580x420": 253}
    assert summary["empty_share"] == pytest.approx(89 / 253, abs=1e-4)
    assert 0 < summary["mask_area"]["min"] <= summary["mask_area"]["median"] <= summary["mask_area"]["max"]


def test_usgra_seg_with_mask_value(capsys, shared_data):
    code, report = inspect_json(capsys, str(shared_data / "usgra-seg"), "--mask-value", "1")
    assert code == 0 and report["problems"] == []
    assert report["summary"]["train_images"] == 204 and report["summary"]["layout"] == "folders"
    assert report["summary"]["subjects"] is None


def test_usgra_seg_without_mask_value_says_how_to_pick_the_class(capsys, shared_data):
    code, report = inspect_json(capsys, str(shared_data / "usgra-seg"))
    assert code == 1
    kinds = {problem["kind"] for problem in report["problems"]}
    assert kinds == {"non_binary_mask"}
    assert len(report["problems"]) == 183  # the other 21 masks hold no vessel (class 2): binary 0/1
    assert "--mask-value" in report["problems"][0]["message"]


def test_montgomery_pairs_and_anti_aliased_masks(capsys, shared_data):
    code, report = inspect_json(capsys, str(shared_data / "montgomery-cxr"), "--mask-threshold", "127")
    assert code == 0 and report["summary"]["train_images"] == 138
    code, report = inspect_json(capsys, str(shared_data / "montgomery-cxr"))
    assert code == 1 and report["summary"]["train_images"] == 138
    assert all("--mask-threshold 127" in problem["message"] for problem in report["problems"])
    assert all(Path(problem["path"]).parent.name == "masks" for problem in report["problems"])


def test_bundled_sample_is_clean_and_from_six_subjects(capsys):
    code, report = inspect_json(capsys, str(sample_data_path()))
    assert code == 0 and report["problems"] == []
    assert report["summary"]["train_images"] == 38 and report["summary"]["subjects"] == 5
    assert report["summary"]["test_images"] == 4
    assert (sample_data_path() / "LICENSE").is_file()
    assert "CC-BY 4.0" in (sample_data_path() / "README.md").read_text()


@pytest.fixture
def broken_uns_mini(tmp_path, shared_data) -> Path:
    """A copy of uns-mini with a truncated frame, a wrong-size mask, a malformed RLE row and a contradicting duplicate."""
    root = tmp_path / "uns-broken"
    shutil.copytree(shared_data / "uns-mini", root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    train = root / "train"
    data = (train / "2_1.tif").read_bytes()
    (train / "2_1.tif").write_bytes(data[: len(data) // 2])
    tifffile.imwrite(train / "3_1_mask.tif", np.zeros((400, 580), dtype=np.uint8), compression="lzw")
    header, *rows = read_rows(root / "train_masks.csv")
    rows = [row if f"{row[0]}_{row[1]}" != "4_1" else [row[0], row[1], "5 10 1 3"] for row in rows]
    # 6_99 is frame 6_1 again (a near-duplicate of one subject) labelled with a mask elsewhere.
    shutil.copyfile(train / "6_1.tif", train / "6_99.tif")
    other = np.zeros((420, 580), dtype=np.uint8)
    other[10:60, 10:60] = 255
    tifffile.imwrite(train / "6_99_mask.tif", other, compression="lzw")
    rows.append(["6", "99", rle.encode(other)])
    write_rows(root / "train_masks.csv", [header, *rows])
    return root


def test_broken_copy_lists_each_problem_with_its_file(capsys, broken_uns_mini):
    code, report = inspect_json(capsys, str(broken_uns_mini))
    assert code == 1
    by_kind = {}
    for problem in report["problems"]:
        by_kind.setdefault(problem["kind"], []).append(Path(problem["path"]))
    train = broken_uns_mini / "train"
    assert by_kind["unreadable_image"] == [train / "2_1.tif"]
    assert by_kind["size_mismatch"] == [train / "3_1_mask.tif"]
    assert by_kind["malformed_rle"] == [broken_uns_mini / "train_masks.csv"]
    assert by_kind["contradicting_duplicates"][0] in {train / "6_1.tif", train / "6_99.tif"}
    assert len(by_kind["contradicting_duplicates"]) == 1
    assert set(by_kind) == {"unreadable_image", "size_mismatch", "malformed_rle", "contradicting_duplicates"}
    assert report["summary"]["train_images"] == 254


def test_broken_copy_in_a_subprocess_prints_lines_not_a_traceback(broken_uns_mini):
    result = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "inspect", str(broken_uns_mini)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "2_1.tif" in result.stdout and "3_1_mask.tif" in result.stdout
    assert "4 problem(s)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "/no/such/folder"], "does not exist"),
        (["inspect", "{data}", "--layout", "coco"], "--layout: Input should be 'kaggle', 'folders' or 'rle-csv'"),
        (["inspect", "{data}", "--rle-order", "X"], "--rle-order"),
        (["inspect", "{data}", "--mask-value", "1", "--mask-threshold", "127"], "exclude each other"),
        (["inspect", "{data}", "--subject-pattern", "("], "not a valid regular expression"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, shared_data, args, message):
    args = [arg.replace("{data}", str(shared_data / "usgra-seg")) for arg in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_empty_folder_is_a_usage_error(capsys, tmp_path):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "folder is empty" in capsys.readouterr().err


def test_missing_csv_column_is_a_one_line_data_error(capsys, small_kaggle_copy):
    root = small_kaggle_copy()
    write_rows(root / "train_masks.csv", [["subject", "img", "rle"], ["1", "1", ""]])
    assert main(["inspect", str(root)]) == 1
    err = capsys.readouterr().err
    assert "train_masks.csv" in err and "pixels" in err and "Traceback" not in err


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("medseg ")
    assert main(["inspect", "--help"]) == 0
    assert "--mask-value" in capsys.readouterr().out


def test_table_output_shows_the_summary(capsys, shared_data):
    assert main(["inspect", str(sample_data_path())]) == 0
    out = capsys.readouterr().out
    assert "train images" in out and "38" in out and "No problems found." in out


def test_near_duplicates_with_agreeing_masks_are_not_problems(shared_data):
    dataset = load_dataset(shared_data / "uns-mini")
    record = dataset.train[0]
    twin = type(record)(record.id + "_twin", record.image_path, record.mask_path, record.rle, record.subject, record.size)
    facts = [examine_labelled(r, DataOptions()) for r in (record, twin)]
    assert contradicting_duplicates(facts) == []


def test_contradiction_by_low_dice(shared_data):
    dataset = load_dataset(shared_data / "uns-mini")
    record = next(r for r in dataset.train if r.rle)
    mask = np.zeros((420, 580), dtype=bool)
    mask[:40, :40] = True
    twin = type(record)("twin", record.image_path, None, rle.encode(mask), record.subject, record.size)
    facts = [examine_labelled(r, DataOptions()) for r in (record, twin)]
    problems = contradicting_duplicates(facts)
    assert len(problems) == 1 and "Dice" in problems[0].message


def test_mask_file_and_csv_row_that_disagree_are_a_problem(small_kaggle_copy):
    root = small_kaggle_copy()
    header, *rows = read_rows(root / "train_masks.csv")
    rows[0][2] = "1 5"
    write_rows(root / "train_masks.csv", [header, *rows])
    inspection = inspect_dataset(load_dataset(root))
    assert [p.kind for p in inspection.problems] == ["mask_csv_disagree"]
    assert inspection.problems[0].path.name == f"{rows[0][0]}_{rows[0][1]}_mask.tif"
