"""The RLE codec against the real Kaggle ground truth, hand-made cases and generated masks."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medseg.data import io, rle

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KAGGLE = DATA / "kaggle-uns"


@pytest.fixture(scope="module")
def kaggle_rows() -> pd.DataFrame:
    return io.read_csv(KAGGLE / "train_masks.csv", ("subject", "img", "pixels"))


def test_every_real_kaggle_row_round_trips(kaggle_rows):
    assert len(kaggle_rows) == 5626
    empty = 0
    for text in kaggle_rows["pixels"]:
        mask = rle.decode(text, (420, 580))
        assert mask.shape == (420, 580) and mask.dtype == np.bool_
        empty += not mask.any()
        assert rle.encode(mask) == text
    assert empty == 3303


def test_kaggle_mask_file_encodes_to_its_csv_row(kaggle_rows):
    mask = io.read_mask(KAGGLE / "train" / "1_1_mask.tif")
    row = kaggle_rows[(kaggle_rows["subject"] == "1") & (kaggle_rows["img"] == "1")]
    assert rle.encode(mask) == row["pixels"].item()


def test_kaggle_order_is_column_major_and_one_indexed():
    mask = np.zeros((3, 4), dtype=bool)
    mask[1:3, 0] = True  # pixels 2 and 3 in column-major numbering
    mask[0, 1] = True  # pixel 4: the run goes on across the column boundary
    assert rle.encode(mask) == "2 3"
    assert rle.encode(mask, order="C") == "2 1 5 1 9 1"
    assert np.array_equal(rle.decode("2 3", (3, 4)), mask)
    assert np.array_equal(rle.decode("2 1 5 1 9 1", (3, 4), order="C"), mask)


def test_full_and_edge_masks():
    full = np.ones((5, 7), dtype=bool)
    assert rle.encode(full) == "1 35"
    assert rle.decode("1 35", (5, 7)).all()
    last = np.zeros((5, 7), dtype=bool)
    last[-1, -1] = True
    assert rle.encode(last) == "35 1"
    assert rle.encode(last, order="C") == "35 1"


def test_empty_string_and_empty_mask():
    assert rle.encode(np.zeros((420, 580), dtype=np.uint8)) == ""
    assert not rle.decode("", (420, 580)).any()
    assert not rle.decode("  ", (4, 4)).any()


def test_uint8_masks_are_foreground_where_non_zero():
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[2:4, 1] = 255
    assert rle.encode(mask) == rle.encode(mask > 0) == "9 2"


def test_touching_runs_decode_as_one_region():
    first_two_columns = np.array([[True, True, False], [True, True, False]])  # pixels 1-4, column-major
    assert np.array_equal(rle.decode("1 2 3 2", (2, 3)), first_two_columns)
    assert np.array_equal(rle.decode("1 4", (2, 3)), first_two_columns)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3", "odd number"),
        ("1 2.5", "not a non-negative integer"),
        ("1 x", "not a non-negative integer"),
        ("-1 2", "not a non-negative integer"),
        ("0 2", "1-indexed"),
        ("1 0", "length 0"),
        ("5 2 1 2", "not after the previous run"),
        ("1 5 3 2", "overlaps"),
        ("20 2", "past the end"),
        ("1 21", "past the end"),
        ("1 " + "9" * 30, "past the end"),
        ("1 9223372036854775807", "past the end"),
        ("1 ２", "not a non-negative integer"),
    ],
)
def test_malformed_rle_raises_rle_error_saying_what(text, message):
    with pytest.raises(rle.RLEError, match=message):
        rle.decode(text, (4, 5))
    with pytest.raises(rle.RLEError, match=message):
        rle.check(text, (4, 5))


def test_rle_error_is_a_value_error_and_non_strings_are_rejected():
    assert issubclass(rle.RLEError, ValueError)
    with pytest.raises(rle.RLEError, match="must be a string"):
        rle.decode(float("nan"), (4, 4))


def test_bad_arguments():
    with pytest.raises(rle.RLEError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2)))
    with pytest.raises(rle.RLEError, match="order"):
        rle.encode(np.zeros((2, 2)), order="K")
    with pytest.raises(rle.RLEError, match="shape"):
        rle.decode("1 1", (0, 5))


ASCII_DIGITS_AND_SPACE = "0123456789 \t\n\r\f\v"


def kaggle_reference_decode(text: str, height: int, width: int) -> np.ndarray:
    """The mask a well-formed Kaggle RLE string stands for, painted run by run (1-indexed, column-major)."""
    flat = np.zeros(height * width, dtype=bool)
    values = [int(value) for value in text.split()]
    for start, length in zip(values[0::2], values[1::2]):
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(width, height).T


def test_the_reference_decoder_paints_the_known_mask():
    mask = np.zeros((3, 4), dtype=bool)
    mask[1:3, 0] = mask[0, 1] = mask[2, 3] = True  # column-major pixels 2, 3, 4 and 12
    assert np.array_equal(kaggle_reference_decode("2 3 12 1", 3, 4), mask)
    assert np.array_equal(rle.decode("2 3 12 1", (3, 4)), mask)


@st.composite
def masks(draw):
    height = draw(st.integers(1, 40))
    width = draw(st.integers(1, 40))
    return draw(arrays(np.bool_, (height, width)))


@settings(max_examples=400, deadline=None)
@given(mask=masks(), order=st.sampled_from(["F", "C"]))
def test_random_masks_round_trip(mask, order):
    text = rle.encode(mask, order=order)
    assert np.array_equal(rle.decode(text, mask.shape, order=order), mask)
    values = [int(v) for v in text.split()]
    starts, lengths = values[0::2], values[1::2]
    assert all(length >= 1 for length in lengths)
    assert all(b > a + n for a, n, b in zip(starts, lengths, starts[1:]))  # canonical: runs never touch


@settings(max_examples=2000, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("0123456789 -+.,xe\t\n٣")), max_size=40), height=st.integers(1, 30), width=st.integers(1, 30)
)
def test_random_strings_raise_only_rle_error(text, height, width):
    try:
        mask = rle.decode(text, (height, width))
    except rle.RLEError:
        return
    assert mask.shape == (height, width)
    np.testing.assert_array_equal(mask, kaggle_reference_decode(text, height, width))


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_unicode_raises_only_rle_error(text):
    try:
        mask = rle.decode(text, (8, 8))
    except rle.RLEError:
        return
    assert set(text) <= set(ASCII_DIGITS_AND_SPACE), repr(text)  # what decodes holds nothing else
    np.testing.assert_array_equal(mask, kaggle_reference_decode(text, 8, 8))


# --------------------------------------------------------------------------- dialects: kaggle, row-major, siim

SIIM = DATA / "siim-sample"


def siim_reference_decode(text: str, height: int, width: int) -> np.ndarray:
    """The SIIM-ACR competition kernel's ``rle2mask``, transposed as its users do (pixels numbered column-major)."""
    mask = np.zeros(width * height, dtype=bool)
    values = [int(value) for value in text.split()]
    position = 0
    for start, length in zip(values[0::2], values[1::2]):
        position += start
        mask[position : position + length] = True
        position += length
    return mask.reshape(width, height).T


def test_siim_offsets_count_from_the_end_of_the_previous_run():
    mask = np.zeros((3, 4), dtype=bool)
    mask[1:3, 0] = True  # column-major pixels 1 and 2 (0-based)
    mask[0, 1] = True  # pixel 3: the run goes on across the column boundary
    mask[2, 3] = True  # pixel 11: 8 pixels after the end of the first run
    assert rle.encode(mask) == "2 3 12 1"
    assert rle.encode(mask, dialect="kaggle") == "2 3 12 1"
    assert rle.encode(mask, dialect="row-major") == rle.encode(mask, order="C") == "2 1 5 1 9 1 12 1"
    assert rle.encode(mask, dialect="siim") == "1 3 7 1"
    assert np.array_equal(rle.decode("1 3 7 1", (3, 4), dialect="siim"), mask)
    assert np.array_equal(siim_reference_decode("1 3 7 1", 3, 4), mask)
    assert rle.encode(np.ones((2, 2)), dialect="siim") == "0 4"  # the first offset counts from pixel 0


def test_siim_empty_mask_is_minus_one_and_is_read_back():
    assert rle.encode(np.zeros((5, 6), dtype=bool), dialect="siim") == "-1"
    for text in ("-1", " -1", "-1 ", ""):
        assert not rle.decode(text, (5, 6), dialect="siim").any()
        rle.check(text, (5, 6), dialect="siim")
    with pytest.raises(rle.RLEError, match="siim dialect's empty mask"):
        rle.decode("-1", (5, 6))  # kaggle: a hint, not only "not a non-negative integer"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3", "odd number"),
        ("-1 2", "not a non-negative integer"),
        ("1 -1", "not a non-negative integer"),
        ("0 0", "length 0"),
        ("19 2", "past the end"),
        ("10 5 5 1", "past the end"),
        ("0 21", "past the end"),
        ("4611686018427387904 4611686018427387904", "past the end"),
        ("1 x", "not a non-negative integer"),
    ],
)
def test_malformed_siim_rle_raises_rle_error_saying_what(text, message):
    with pytest.raises(rle.RLEError, match=message):
        rle.decode(text, (4, 5), dialect="siim")
    with pytest.raises(rle.RLEError, match=message):
        rle.check(text, (4, 5), dialect="siim")


def test_dialect_and_order_must_agree():
    mask = np.eye(3, dtype=bool)
    assert rle.encode(mask, "C", dialect="row-major") == rle.encode(mask, "C")
    assert rle.encode(mask, "F", dialect="siim") == rle.encode(mask, dialect="siim")
    for order, dialect in (("C", "kaggle"), ("C", "siim"), ("F", "row-major")):
        with pytest.raises(rle.RLEError, match="contradicts"):
            rle.encode(mask, order, dialect=dialect)
        with pytest.raises(rle.RLEError, match="contradicts"):
            rle.decode("", (3, 3), order, dialect=dialect)
    with pytest.raises(rle.RLEError, match="unknown RLE dialect 'uw'; use kaggle, row-major or siim"):
        rle.check("", (3, 3), dialect="uw")


def test_real_siim_sample_rows_decode_to_one_plausible_blob_each():
    table = io.read_csv(SIIM / "train-rle.csv", ("ImageId", "EncodedPixels"))  # header "ImageId, EncodedPixels"
    assert len(table) == 10 and sum(text.strip() == "-1" for text in table["EncodedPixels"]) == 5
    areas = []
    for text in table["EncodedPixels"]:
        mask = rle.decode(text, (1024, 1024), dialect="siim")
        assert mask.shape == (1024, 1024)
        if text.strip() == "-1":
            assert not mask.any()
            continue
        np.testing.assert_array_equal(mask, siim_reference_decode(text, 1024, 1024))
        count, _ = cv2.connectedComponents(mask.astype(np.uint8))
        areas.append(int(mask.sum()))
        assert count - 1 == 1  # one connected region: relative offsets read right, not a scatter of runs
        assert rle.encode(mask, dialect="siim") == " ".join(text.split())
        with pytest.raises(rle.RLEError, match="not after the previous run|overlaps"):
            rle.decode(text, (1024, 1024))  # as absolute starts they are not increasing
    assert len(areas) == 5 and all(1000 < area < 0.1 * 1024 * 1024 for area in areas), areas
    guess = rle.guess_dialect(list(table["EncodedPixels"]), [(1024, 1024)] * 10, first_row=2)
    assert guess.dialect == "siim" and "row 2" in guess.reason


@st.composite
def edge_masks(draw):
    """Random masks, and the edge cases: empty, full, one pixel (first, last or any)."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["random", "random", "empty", "full", "pixel"]))
    if kind == "random":
        return draw(arrays(np.bool_, (height, width)))
    mask = np.full((height, width), kind == "full")
    if kind == "pixel":
        mask[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))] = True
    return mask


@settings(max_examples=400, deadline=None)
@given(mask=edge_masks(), dialect=st.sampled_from(rle.DIALECTS))
def test_every_dialect_round_trips(mask, dialect):
    text = rle.encode(mask, dialect=dialect)
    assert np.array_equal(rle.decode(text, mask.shape, dialect=dialect), mask)
    rle.check(text, mask.shape, dialect=dialect)
    if not mask.any():
        assert text == ("-1" if dialect == "siim" else "")
        return
    values = [int(v) for v in text.split()]
    starts, lengths = values[0::2], values[1::2]
    assert all(length >= 1 for length in lengths) and sum(lengths) == mask.sum()
    if dialect == "siim":
        assert starts[0] >= 0 and all(offset >= 1 for offset in starts[1:])  # canonical: runs never touch
        assert np.array_equal(siim_reference_decode(text, *mask.shape), mask)
    else:
        assert all(b > a + n for a, n, b in zip(starts, lengths, starts[1:]))


@st.composite
def mask_stacks(draw):
    """1 to 4 random masks of one shape (regions of one frame, each on its own row)."""
    height, width = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    return draw(st.lists(arrays(np.bool_, (height, width)), min_size=1, max_size=4))


@settings(max_examples=200, deadline=None)
@given(parts=mask_stacks(), dialect=st.sampled_from(rle.DIALECTS))
def test_several_rows_of_one_frame_decode_to_their_union(parts, dialect):
    texts = [rle.encode(part, dialect=dialect) for part in parts]
    union = np.logical_or.reduce(parts)
    assert np.array_equal(rle.decode_union(texts, parts[0].shape, dialect=dialect), union)
    assert not rle.decode_union([], parts[0].shape, dialect=dialect).any()


def test_guess_dialect_tells_absolute_starts_from_relative_offsets():
    shape = (10, 10)
    kaggle = rle.encode(np.eye(10, dtype=bool))  # "1 1 12 1 23 1 ...": as offsets it runs past the frame
    siim = rle.encode(np.eye(10, dtype=bool), dialect="siim")  # "0 1 10 1 10 1 ...": starts not increasing
    assert rle.guess_dialect([kaggle, ""], [shape, shape]).dialect == "kaggle"
    assert rle.guess_dialect([siim], [shape]).dialect == "siim"
    assert rle.guess_dialect(["-1", "5 3"], [shape, shape]).dialect == "siim"
    assert rle.guess_dialect(["5 3", ""], [shape, shape]).dialect == "kaggle"  # an empty cell is kaggle's empty mask
    assert rle.guess_dialect(["5 3"], [shape], siim_header=True).dialect == "siim"
    assert rle.guess_dialect(["", ""]).dialect == "kaggle"
    unknown = rle.guess_dialect(["5 3", "7 2"], [shape, shape])
    assert unknown.dialect is None and not unknown.contradictory and "both" in unknown.reason
    mixed = rle.guess_dialect([kaggle, "-1"], [shape, shape], first_row=2)
    assert mixed.dialect is None and mixed.contradictory and "row 3" in mixed.reason and "row 2" in mixed.reason
    assert rle.guess_dialect(["5 3", ""], [shape, shape], siim_header=True).contradictory
    assert rle.guess_dialect([kaggle], [None]).dialect is None  # unbounded: increasing starts read both ways
