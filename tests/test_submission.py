"""The submission writer and validator on real uns-mini ids and real Kaggle RLE masks."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.data import io, rle
from medseg.errors import DataError
from medseg.infer.submission import SubmissionError, check_or_raise, read_sample_ids, validate, validate_file, write_submission

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SAMPLE = DATA / "uns-mini" / "sample_submission.csv"
KAGGLE_MASKS = DATA / "kaggle-uns" / "train_masks.csv"
SIZE = (420, 580)
FULL = f"1 {SIZE[0] * SIZE[1]}"


@pytest.fixture(scope="module")
def sample_ids() -> list[str]:
    return read_sample_ids(SAMPLE)


@pytest.fixture(scope="module")
def kaggle_rles() -> list[str]:
    return io.read_csv(KAGGLE_MASKS, ("subject", "img", "pixels"))["pixels"].tolist()


@pytest.fixture(scope="module")
def real_rles(sample_ids, kaggle_rles) -> list[str]:
    """The first non-empty Kaggle masks, one per uns-mini test id."""
    return [text for text in kaggle_rles if text][: len(sample_ids)]


def problems_of(ids, rles, sample_ids) -> str:
    report = validate(ids, rles, sample_ids, sizes=SIZE, train_had_masks=True)
    assert not report.ok and not report.degenerate
    return " | ".join(report.problems)


def test_sample_ids_are_read_in_file_order(sample_ids):
    assert len(sample_ids) == 53
    assert sample_ids[:3] == ["1", "2", "3"]


def test_real_submission_passes_and_round_trips(tmp_path, sample_ids, real_rles):
    report = validate(sample_ids, real_rles, sample_ids, sizes=SIZE, train_had_masks=True)
    assert report.ok and report.bounds_checked
    assert (report.rows, report.empty, report.notes) == (53, 0, [])
    out = tmp_path / "submission.csv"
    write_submission(out, sample_ids, real_rles)
    lines = out.read_bytes().decode("utf-8").split("\n")
    assert len(lines) == 55 and lines[-1] == "" and "\r" not in out.read_text()
    assert lines[0] == "img,pixels"
    assert [line.split(",")[0] for line in lines[1:-1]] == sample_ids
    table = io.read_csv(out, ("img", "pixels"))
    assert table["img"].tolist() == sample_ids and table["pixels"].tolist() == real_rles
    again = validate_file(out, sample=SAMPLE, sizes=SIZE, train_had_masks=True)
    assert again.ok and again.path == out
    assert (again.rows, again.empty, again.problems, again.degenerate) == (report.rows, report.empty, [], [])


def test_empty_masks_are_written_as_empty_cells(tmp_path, sample_ids, real_rles):
    rles = ["" if i % 2 else text for i, text in enumerate(real_rles)]
    out = tmp_path / "submission.csv"
    write_submission(out, sample_ids, rles, header=("ImageId", "EncodedPixels"))
    assert out.read_text().splitlines()[:3] == ["ImageId,EncodedPixels", f"1,{rles[0]}", "2,"]
    report = validate_file(out, sample=SAMPLE, sizes=SIZE)
    assert report.ok and report.empty == 26


def test_all_full_masks_are_refused_unless_allowed(sample_ids):
    report = validate(sample_ids, [FULL] * len(sample_ids), sample_ids, sizes=SIZE)
    assert not report.ok and not report.problems
    with pytest.raises(SubmissionError, match="every mask is full") as raised:
        check_or_raise(report, allow_degenerate=False, warn=pytest.fail)
    assert "--allow-degenerate" in str(raised.value) and "\n" not in str(raised.value)
    warnings: list[str] = []
    check_or_raise(report, allow_degenerate=True, warn=warnings.append)
    assert any("every mask is full" in warning for warning in warnings)
    assert len(warnings) == len(report.degenerate)


def test_nearly_full_masks_alongside_empty_ones_are_degenerate(sample_ids, real_rles):
    nearly_full = f"1 {int(0.95 * SIZE[0] * SIZE[1])}"
    rles = [nearly_full if i % 3 == 0 else "" for i in range(len(sample_ids))]
    report = validate(sample_ids, rles, sample_ids, sizes=SIZE)
    assert report.degenerate == ["every non-empty mask is full or nearly full (18 of 53 cover >= 90% of their frame, the rest are empty)"]
    mixed = [nearly_full] + real_rles[1:]
    assert validate(sample_ids, mixed, sample_ids, sizes=SIZE).ok


def test_missing_id_is_reported_by_name(sample_ids, real_rles):
    assert "1 sample id(s) missing ('7')" in problems_of(sample_ids[:6] + sample_ids[7:], real_rles[:52], sample_ids)


def test_extra_id_is_reported_by_name(sample_ids, real_rles):
    assert "not in the sample submission ('999')" in problems_of([*sample_ids, "999"], [*real_rles, ""], sample_ids)


def test_duplicate_id_is_reported_by_name(sample_ids, real_rles):
    assert "listed more than once ('5')" in problems_of([*sample_ids, "5"], [*real_rles, ""], sample_ids)


def test_many_missing_ids_are_counted_and_the_first_few_named(sample_ids, real_rles):
    text = problems_of(sample_ids[:10], real_rles[:10], sample_ids)
    assert "43 sample id(s) missing ('11', '12', '13', '14', '15', and 38 more)" in text


def test_rle_past_the_frame_is_reported_with_its_id(sample_ids, real_rles):
    rles = list(real_rles)
    rles[4] = f"{SIZE[0] * SIZE[1] - 10} 20"
    text = problems_of(sample_ids, rles, sample_ids)
    assert text.startswith("row 5, id '5':") and "past the end of the image" in text


def test_problems_are_raised_even_when_degenerate_output_is_allowed(sample_ids, real_rles):
    report = validate(sample_ids[1:], real_rles[1:], sample_ids, sizes=SIZE, path=Path("sub.csv"))
    with pytest.raises(SubmissionError, match=r"^sub\.csv: 1 problem\(s\): 1 sample id\(s\) missing \('1'\)"):
        check_or_raise(report, allow_degenerate=True, warn=pytest.fail)


def test_identical_non_empty_masks_are_degenerate(sample_ids, real_rles):
    report = validate(sample_ids, [real_rles[0]] * len(sample_ids), sample_ids, sizes=SIZE)
    assert not report.problems
    assert report.degenerate == [f"every mask is the same non-empty mask (53 rows, {rle.decode(real_rles[0], SIZE).sum()} pixels each)"]


def test_all_empty_is_degenerate_only_when_training_had_masks(sample_ids):
    empty = [""] * len(sample_ids)
    trained_on_masks = validate(sample_ids, empty, sample_ids, sizes=SIZE, train_had_masks=True)
    assert trained_on_masks.degenerate == ["every mask is empty (53 rows) while the training data had masks"]
    assert trained_on_masks.empty == 53
    assert validate(sample_ids, empty, sample_ids, sizes=SIZE, train_had_masks=False).ok
    unknown = validate(sample_ids, empty, sample_ids, sizes=SIZE)
    assert unknown.ok and any("unknown whether the training data had masks" in note for note in unknown.notes)


def test_without_sizes_only_syntax_is_checked_and_the_report_says_so(sample_ids, real_rles):
    report = validate(sample_ids, [FULL] * len(sample_ids), sample_ids)
    assert not report.bounds_checked and not report.problems
    assert [finding.startswith("every mask is the same") for finding in report.degenerate] == [True]
    assert any("full-mask check skipped" in note for note in report.notes)
    assert any("no frame sizes given" in note for note in report.notes)
    rles = list(real_rles)
    rles[2] = "10 5 8 3"
    problems = validate(sample_ids, rles, sample_ids).problems
    assert problems == ["row 3, id '3': run 2 (start 8) is not after the previous run; runs must be increasing and disjoint"]


def test_sizes_may_differ_per_id(sample_ids, real_rles):
    sizes = {sample_id: SIZE for sample_id in sample_ids}
    sizes["2"] = (10, 10)
    report = validate(sample_ids, real_rles, sample_ids, sizes=sizes)
    assert report.bounds_checked
    assert [problem.split(":")[0] for problem in report.problems] == ["row 2, id '2'"]
    del sizes["3"]
    unsized = validate(sample_ids, real_rles, sample_ids, sizes=sizes)
    assert not unsized.bounds_checked and any("'3'" in note for note in unsized.notes)


def test_validate_file_names_a_non_utf8_file(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("img,pixels\n1,\n2,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SubmissionError, match=rf"^{bad}: not UTF-8"):
        validate_file(bad)


def test_validate_file_names_a_file_without_a_pixels_column(tmp_path):
    bad = tmp_path / "nopixels.csv"
    bad.write_text("img,subject\n1,3\n")
    with pytest.raises(SubmissionError, match=rf"^{bad}: no mask column .*img,pixels"):
        validate_file(bad)


def test_validate_file_names_a_missing_file(tmp_path):
    with pytest.raises(SubmissionError, match="file not found"):
        validate_file(tmp_path / "absent.csv")


def test_bad_sample_submission_is_a_data_error(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("img,pixels\n1,\n1,\n")
    with pytest.raises(DataError, match=rf"^{sample}: 1 id\(s\) listed more than once \('1'\)"):
        read_sample_ids(sample)


def test_full_kaggle_scale_submission_validates(kaggle_rles):
    rles = (kaggle_rles * 2)[:5508]
    ids = [str(n) for n in range(1, 5509)]
    report = validate(ids, rles, ids, sizes=SIZE, train_had_masks=True)
    assert report.ok and report.rows == 5508
    assert report.empty == sum(not text for text in rles)
