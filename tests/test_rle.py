"""The RLE codec against the real Kaggle ground truth, hand-made cases and generated masks."""

from pathlib import Path

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
    assert np.array_equal(rle.decode("1 2 3 2", (2, 3)), rle.decode("1 4", (2, 3)))


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


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_unicode_raises_only_rle_error(text):
    try:
        rle.decode(text, (8, 8))
    except rle.RLEError:
        pass
