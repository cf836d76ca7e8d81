"""Tests for medseg.datasets on the real data in ../shared/data and on broken copies of it."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read_rows, uns_mini_rle, write_rows
from medseg.data import io, rle
from medseg.data.datasets import DataOptions, Dataset, Record, detect_layout, load_dataset, mask_of, subject_matcher
from medseg.data.inspector import inspect_dataset
from medseg.errors import DataError, FileError, UsageError

KAGGLE_SIZE = (420, 580)


def kinds(dataset: Dataset) -> Counter:
    return Counter(problem.kind for problem in dataset.problems)


def only_problem(dataset: Dataset, kind: str):
    found = [problem for problem in dataset.problems if problem.kind == kind]
    assert len(found) == 1, dataset.problems
    return found[0]


# --------------------------------------------------------------------------- real data sets


@pytest.fixture(scope="module")
def uns_mini(shared_data: Path) -> Dataset:
    return load_dataset(shared_data / "uns-mini")


def test_uns_mini_layout_and_counts(uns_mini: Dataset, shared_data: Path) -> None:
    assert uns_mini.layout == "kaggle"
    assert uns_mini.root == shared_data / "uns-mini"
    assert len(uns_mini.train) == 253
    assert len(uns_mini.test) == 53
    assert len({record.subject for record in uns_mini.train}) == 25
    assert uns_mini.problems == []


def test_uns_mini_records(uns_mini: Dataset, shared_data: Path) -> None:
    train_dir = shared_data / "uns-mini" / "train"
    for record in uns_mini.train:
        assert record.mask_path == train_dir / f"{record.id}_mask.tif"
        assert record.image_path == train_dir / f"{record.id}.tif"
        assert record.rle is not None
        assert record.has_mask
        assert record.size == KAGGLE_SIZE
        assert record.subject == record.id.split("_")[0]
    assert sum(record.rle == "" for record in uns_mini.train) == 89  # empty masks: empty RLE, not missing
    first = next(record for record in uns_mini.train if record.id == "1_1")
    assert first.subject == "1"
    assert first.rle == uns_mini_rle("1_1")
    assert len({record.id for record in uns_mini.train}) == 253


def test_uns_mini_test_and_sample_submission(uns_mini: Dataset, shared_data: Path) -> None:
    sample = shared_data / "uns-mini" / "sample_submission.csv"
    assert uns_mini.sample_submission == sample
    assert uns_mini.sample_ids == [row[0] for row in read_rows(sample)[1:]]
    assert set(uns_mini.sample_ids) == {record.id for record in uns_mini.test}
    for record in uns_mini.test:
        assert record.image_path == shared_data / "uns-mini" / "test" / f"{record.id}.tif"
        assert record.size == KAGGLE_SIZE
        assert not record.has_mask and record.subject is None


def test_uns_mini_mask_of_agrees_with_files(uns_mini: Dataset) -> None:
    records = {record.id: record for record in uns_mini.train}
    for sample_id in ("1_1", "1_2", "1_3"):
        record = records[sample_id]
        mask = mask_of(record, uns_mini.options)
        assert mask.dtype == np.bool_ and mask.shape == KAGGLE_SIZE
        np.testing.assert_array_equal(mask, io.read_mask(record.mask_path))
        np.testing.assert_array_equal(mask, rle.decode(record.rle, KAGGLE_SIZE))
    assert mask_of(records["1_1"], uns_mini.options).any()
    assert not mask_of(records["1_2"], uns_mini.options).any()


def test_usgra_seg_folders(shared_data: Path) -> None:
    options = DataOptions(mask_value=1)
    dataset = load_dataset(shared_data / "usgra-seg", options)
    assert dataset.layout == "folders"
    assert len(dataset.train) == 204
    assert dataset.test == [] and dataset.sample_ids == [] and dataset.sample_submission is None
    assert dataset.problems == []
    assert all(record.subject is None for record in dataset.train)
    assert all(record.rle is None and record.mask_path is not None for record in dataset.train)
    record = next(record for record in dataset.train if record.id == "0040")
    assert record.mask_path == shared_data / "usgra-seg" / "masks" / "0040.png"
    assert record.size == io.image_size(record.image_path)
    np.testing.assert_array_equal(mask_of(record, options), np.array(Image.open(record.mask_path)) == 1)


def test_montgomery_subjects(shared_data: Path) -> None:
    options = DataOptions(subject_pattern=r"MCUCXR_(\d+)_", mask_threshold=127)
    dataset = load_dataset(shared_data / "montgomery-cxr", options)
    assert dataset.layout == "folders"
    assert len(dataset.train) == 138
    subjects = [record.subject for record in dataset.train]
    assert None not in subjects
    assert len(set(subjects)) == 138
    record = next(record for record in dataset.train if record.id == "MCUCXR_0001_0")
    assert record.subject == "0001"
    assert dataset.problems == []


# --------------------------------------------------------------------------- detect_layout


def test_detect_layout_real(shared_data: Path) -> None:
    assert detect_layout(shared_data / "uns-mini") == "kaggle"
    assert detect_layout(shared_data / "usgra-seg") == "folders"
    assert detect_layout(shared_data / "montgomery-cxr") == "folders"


def test_detect_layout_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist") as caught:
        detect_layout(tmp_path / "no_such_data")
    assert "no_such_data" in str(caught.value)
    with pytest.raises(UsageError):
        load_dataset(tmp_path / "no_such_data")


def test_detect_layout_file_not_folder(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("img,pixels\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not a folder"):
        detect_layout(path)


def test_detect_layout_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="empty"):
        detect_layout(tmp_path)


def test_detect_layout_unrecognisable(tmp_path: Path, shared_data: Path) -> None:
    shutil.copyfile(shared_data / "uns-mini" / "train" / "1_1.tif", tmp_path / "1_1.tif")
    (tmp_path / "images").mkdir()  # images/ without masks/ or a CSV
    with pytest.raises(UsageError, match="cannot tell the layout"):
        detect_layout(tmp_path)
    with pytest.raises(UsageError):
        load_dataset(tmp_path)


def test_unknown_layout_option() -> None:
    with pytest.raises(ValueError, match="'kaggle', 'folders' or 'rle-csv'"):
        DataOptions(layout="coco")


# --------------------------------------------------------------------------- rle-csv layout


RLE_IDS = ("1_1", "1_2", "1_3")


def make_rle_csv(root: Path, shared_data: Path, header: tuple[str, str], suffix: str = "", name: str = "masks.csv") -> Path:
    """images/ with a few uns-mini frames and one CSV of id,rle under ``header``."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for sample_id in RLE_IDS:
        shutil.copyfile(shared_data / "uns-mini" / "train" / f"{sample_id}.tif", images / f"{sample_id}.tif")
    write_rows(root / name, [header] + [(f"{sample_id}{suffix}", uns_mini_rle(sample_id)) for sample_id in RLE_IDS])
    return root


def check_rle_records(dataset: Dataset, shared_data: Path) -> None:
    assert dataset.layout == "rle-csv"
    assert dataset.problems == []
    assert [record.id for record in dataset.train] == list(RLE_IDS)
    for record in dataset.train:
        assert record.mask_path is None
        assert record.rle == uns_mini_rle(record.id)
        assert record.size == KAGGLE_SIZE
        expected = io.read_mask(shared_data / "uns-mini" / "train" / f"{record.id}_mask.tif")
        np.testing.assert_array_equal(mask_of(record, dataset.options), expected)


def test_rle_csv_guessed_columns(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("ImageId", "EncodedPixels"))
    assert detect_layout(root) == "rle-csv"
    check_rle_records(load_dataset(root), shared_data)


def test_rle_csv_custom_columns(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("frame", "nerve_rle"))
    dataset = load_dataset(root, DataOptions(id_column="frame", rle_column="nerve_rle"))
    check_rle_records(dataset, shared_data)


def test_rle_csv_ids_with_image_suffix(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("id", "rle"), suffix=".tif")
    assert read_rows(root / "masks.csv")[1][0] == "1_1.tif"
    check_rle_records(load_dataset(root), shared_data)


def test_rle_csv_unknown_columns(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("frame", "nerve_rle"))
    with pytest.raises(DataError) as caught:
        load_dataset(root)
    message = str(caught.value)
    assert "masks.csv" in message
    assert "frame" in message and "nerve_rle" in message


def test_rle_csv_named_columns_absent(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("frame", "nerve_rle"))
    with pytest.raises(DataError) as caught:
        load_dataset(root, DataOptions(id_column="ImageId", rle_column="EncodedPixels"))
    message = str(caught.value)
    assert "masks.csv" in message
    assert "ImageId" in message and "EncodedPixels" in message
    assert "found: frame, nerve_rle" in message


def test_rle_csv_two_tables(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("ImageId", "EncodedPixels"))
    write_rows(root / "other.csv", [("id", "rle"), ("1_1", "")])
    with pytest.raises(UsageError, match="masks.csv, other.csv"):
        load_dataset(root)
    check_rle_records(load_dataset(root, DataOptions(csv="masks.csv")), shared_data)
    with pytest.raises(UsageError, match="missing.csv"):
        load_dataset(root, DataOptions(csv="missing.csv"))


def test_rle_csv_empty_table(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("ImageId", "EncodedPixels"))
    (root / "masks.csv").write_bytes(b"")
    with pytest.raises(DataError, match="empty") as caught:
        load_dataset(root)
    assert "masks.csv" in str(caught.value)


def test_rle_csv_structural_problems(tmp_path: Path, shared_data: Path) -> None:
    root = make_rle_csv(tmp_path / "data", shared_data, ("ImageId", "EncodedPixels"))
    rows = read_rows(root / "masks.csv")
    rows = [rows[0], rows[1], rows[1], ("1_3", "243590 20"), ("77_7", "")]  # 1_2 gone, 1_1 twice, 1_3 too long
    write_rows(root / "masks.csv", rows)
    dataset = load_dataset(root)
    csv_path = root / "masks.csv"
    assert kinds(dataset) == Counter(missing_mask=1, duplicate_id=1, missing_image=1)
    assert only_problem(dataset, "missing_mask").path == root / "images" / "1_2.tif"
    assert only_problem(dataset, "duplicate_id").path == csv_path
    malformed = [p for p in inspect_dataset(dataset).problems if p.kind == "malformed_rle"]  # found when decoded
    assert [p.path for p in malformed] == [csv_path]
    assert "1_3" in malformed[0].message
    assert only_problem(dataset, "missing_image").path == csv_path
    assert "77_7" in only_problem(dataset, "missing_image").message


# --------------------------------------------------------------------------- kaggle structural problems


def test_kaggle_copy_is_clean(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    dataset = load_dataset(root)
    assert dataset.layout == "kaggle"
    assert [record.id for record in dataset.train] == ["1_1", "1_2", "1_3"]
    assert [record.id for record in dataset.test] == ["1", "2"]
    assert dataset.sample_ids == ["1", "2"]
    assert dataset.problems == []


def test_kaggle_missing_mask(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    (root / "train" / "1_2_mask.tif").unlink()
    rows = read_rows(root / "train_masks.csv")
    write_rows(root / "train_masks.csv", [row for row in rows if row[:2] != ["1", "2"]])
    dataset = load_dataset(root)
    problem = only_problem(dataset, "missing_mask")
    assert problem.path == root / "train" / "1_2.tif"
    assert kinds(dataset) == Counter(missing_mask=1)
    record = next(record for record in dataset.train if record.id == "1_2")
    assert not record.has_mask
    with pytest.raises(DataError, match="1_2.tif"):
        mask_of(record, dataset.options)


def test_kaggle_mask_file_alone_is_enough(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    rows = read_rows(root / "train_masks.csv")
    write_rows(root / "train_masks.csv", [row for row in rows if row[:2] != ["1", "2"]])
    dataset = load_dataset(root)
    assert dataset.problems == []
    record = next(record for record in dataset.train if record.id == "1_2")
    assert record.rle is None and record.mask_path == root / "train" / "1_2_mask.tif"


def test_kaggle_csv_row_without_frame(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    rows = read_rows(root / "train_masks.csv")
    write_rows(root / "train_masks.csv", rows + [["99", "4", ""]])
    dataset = load_dataset(root)
    problem = only_problem(dataset, "missing_image")
    assert problem.path == root / "train_masks.csv"
    assert "99_4" in problem.message
    assert kinds(dataset) == Counter(missing_image=1)


def test_kaggle_mask_file_without_frame(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    (root / "train" / "1_3.tif").unlink()
    dataset = load_dataset(root)
    paths = {problem.path for problem in dataset.problems if problem.kind == "missing_image"}
    assert paths == {root / "train" / "1_3_mask.tif", root / "train_masks.csv"}
    assert kinds(dataset) == Counter(missing_image=2)
    assert [record.id for record in dataset.train] == ["1_1", "1_2"]


def test_kaggle_duplicate_csv_row(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    rows = read_rows(root / "train_masks.csv")
    write_rows(root / "train_masks.csv", rows + [rows[1]])
    dataset = load_dataset(root)
    problem = only_problem(dataset, "duplicate_id")
    assert problem.path == root / "train_masks.csv"
    assert "1_1" in problem.message and "row 5" in problem.message and "row 2" in problem.message
    assert kinds(dataset) == Counter(duplicate_id=1)
    assert len(dataset.train) == 3


def test_kaggle_rle_past_frame(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    rows = read_rows(root / "train_masks.csv")
    n_pixels = KAGGLE_SIZE[0] * KAGGLE_SIZE[1]
    rows = [row[:2] + [f"{n_pixels - 5} 10"] if row[:2] == ["1", "2"] else row for row in rows]
    write_rows(root / "train_masks.csv", rows)
    dataset = load_dataset(root)
    assert dataset.problems == []  # the row is checked when decoded at the frame's size
    problems = inspect_dataset(dataset).problems
    assert [(p.kind, p.path) for p in problems] == [("malformed_rle", root / "train_masks.csv")]
    assert "1_2" in problems[0].message and "past the end" in problems[0].message
    record = next(record for record in dataset.train if record.id == "1_2")
    with pytest.raises(FileError, match="past the end") as raised:
        mask_of(record, dataset.options)
    assert raised.value.kind == "malformed_rle"


def test_kaggle_stray_file(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    (root / "train" / "notes.txt").write_text("scanned on tuesday\n", encoding="utf-8")
    (root / "train" / ".DS_Store").write_bytes(b"\x00")  # hidden files are ignored
    dataset = load_dataset(root)
    problem = only_problem(dataset, "unexpected_file")
    assert problem.path == root / "train" / "notes.txt"
    assert kinds(dataset) == Counter(unexpected_file=1)
    assert len(dataset.train) == 3


def test_kaggle_broken_link_is_named_as_one(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    (root / "train" / "9_9.tif").symlink_to(root / "elsewhere" / "9_9.tif")
    dataset = load_dataset(root)
    problem = only_problem(dataset, "unexpected_file")
    assert problem.path == root / "train" / "9_9.tif"
    assert "broken link" in problem.message and "elsewhere" in problem.message
    assert len(dataset.train) == 3


def test_kaggle_test_frame_not_in_sample_submission(small_kaggle_copy) -> None:
    root = small_kaggle_copy(test_ids=("1", "2", "3"))
    rows = read_rows(root / "sample_submission.csv")
    write_rows(root / "sample_submission.csv", [row for row in rows if row[0] != "2"])
    dataset = load_dataset(root)
    problem = only_problem(dataset, "unlisted_test_image")
    assert problem.path == root / "test" / "2.tif"
    assert kinds(dataset) == Counter(unlisted_test_image=1)
    assert dataset.sample_ids == ["1", "3"]


def test_kaggle_sample_id_without_frame(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    rows = read_rows(root / "sample_submission.csv")
    write_rows(root / "sample_submission.csv", rows + [["99", ""]])
    dataset = load_dataset(root)
    problem = only_problem(dataset, "missing_image")
    assert problem.path == root / "sample_submission.csv"
    assert "99" in problem.message
    assert kinds(dataset) == Counter(missing_image=1)
    assert dataset.sample_ids == ["1", "2", "99"]


def test_kaggle_all_problems_together(small_kaggle_copy) -> None:
    root = small_kaggle_copy(test_ids=("1", "2", "3"))
    (root / "train" / "1_3_mask.tif").unlink()
    rows = read_rows(root / "train_masks.csv")
    rows = [row for row in rows if row[:2] != ["1", "3"]] + [rows[1], ["99", "4", ""]]
    rows = [row[:2] + ["243595 10"] if row[:2] == ["1", "2"] else row for row in rows]
    write_rows(root / "train_masks.csv", rows)
    (root / "train" / "notes.txt").write_text("x", encoding="utf-8")
    write_rows(root / "sample_submission.csv", [["img", "pixels"], ["1", ""], ["3", ""], ["98", ""]])
    dataset = load_dataset(root)
    assert kinds(dataset) == Counter(missing_mask=1, missing_image=2, duplicate_id=1, unexpected_file=1, unlisted_test_image=1)
    by_kind = {}
    for problem in dataset.problems:
        by_kind.setdefault(problem.kind, set()).add(problem.path)
    assert by_kind["missing_mask"] == {root / "train" / "1_3.tif"}
    assert by_kind["missing_image"] == {root / "train_masks.csv", root / "sample_submission.csv"}
    assert by_kind["unexpected_file"] == {root / "train" / "notes.txt"}
    assert by_kind["unlisted_test_image"] == {root / "test" / "2.tif"}


# --------------------------------------------------------------------------- mask_of


def test_mask_of_file_and_rle_disagree(small_kaggle_copy) -> None:
    root = small_kaggle_copy()
    rows = read_rows(root / "train_masks.csv")
    rows = [row[:2] + ["1 10"] if row[:2] == ["1", "2"] else row for row in rows]  # 1_2 mask file is empty
    write_rows(root / "train_masks.csv", rows)
    dataset = load_dataset(root)
    assert dataset.problems == []  # pixel-level checks are not the loader's job
    record = next(record for record in dataset.train if record.id == "1_2")
    with pytest.raises(DataError, match="disagree") as caught:
        mask_of(record, dataset.options)
    message = str(caught.value)
    assert "1_2_mask.tif" in message
    assert "10 pixels differ" in message


def test_mask_of_without_mask(shared_data: Path) -> None:
    record = Record(id="1", image_path=shared_data / "uns-mini" / "test" / "1.tif", size=KAGGLE_SIZE)
    with pytest.raises(DataError, match="no mask") as caught:
        mask_of(record, DataOptions())
    assert "1.tif" in str(caught.value)


def test_mask_of_rle_only_uses_header_size(shared_data: Path) -> None:
    record = Record(id="1_1", image_path=shared_data / "uns-mini" / "train" / "1_1.tif", rle=uns_mini_rle("1_1"))
    mask = mask_of(record, DataOptions())
    assert mask.shape == KAGGLE_SIZE
    np.testing.assert_array_equal(mask, io.read_mask(shared_data / "uns-mini" / "train" / "1_1_mask.tif"))


def test_mask_of_row_major_order(shared_data: Path) -> None:
    truth = io.read_mask(shared_data / "uns-mini" / "train" / "1_1_mask.tif")
    record = Record(
        id="1_1",
        image_path=shared_data / "uns-mini" / "train" / "1_1.tif",
        rle=rle.encode(truth, order="C"),
        size=KAGGLE_SIZE,
    )
    np.testing.assert_array_equal(mask_of(record, DataOptions(rle_order="C")), truth)
    assert not np.array_equal(mask_of(record, DataOptions(rle_order="F")), truth)


# --------------------------------------------------------------------------- subject_matcher


def test_subject_matcher_named_group() -> None:
    subject = subject_matcher(r"^P(?P<subject>\d+)-(\d+)")
    assert subject("P012-3") == "012"


def test_subject_matcher_first_group() -> None:
    subject = subject_matcher(r"MCUCXR_(\d+)_(\d)")
    assert subject("MCUCXR_0042_1") == "0042"


def test_subject_matcher_whole_match() -> None:
    subject = subject_matcher(r"[a-z]+\d+")
    assert subject("scan_abc12_7") == "abc12"


def test_subject_matcher_no_match() -> None:
    assert subject_matcher(r"MCUCXR_(\d+)_")("0040") is None
    assert subject_matcher(None)("1_1") is None


def test_subject_matcher_invalid_regex() -> None:
    with pytest.raises(UsageError, match="not a valid regular expression"):
        subject_matcher(r"(unclosed")


def test_no_subject_problem(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
        shutil.copyfile(shared_data / "usgra-seg" / folder / "0040.png", root / folder / "0040.png")
    dataset = load_dataset(root, DataOptions(mask_value=1, subject_pattern=r"MCUCXR_(\d+)_"))
    problem = only_problem(dataset, "no_subject")
    assert problem.path == root / "images" / "0040.png"
    assert dataset.train[0].subject is None
