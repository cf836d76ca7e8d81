"""Property tests on generated inputs: only the documented error types may escape medseg's parsers.

- ``rle.decode`` / ``rle.check``: ``rle.RLEError`` (a ``ValueError``) or a mask of the right shape;
- ``io.read_csv``: ``DataError`` naming the file, or a table of text cells with the required columns;
- ``submission.validate_file``: ``DataError`` (``SubmissionError``) or a consistent report;
- ``config.load_config``: ``UsageError`` or a validated configuration.

Where an input is accepted, what comes back is checked too: decoded masks hold exactly their runs and
re-encode to themselves, a well-formed CSV table is read cell for cell, and a later ``--set`` of a key
replaces an earlier one. Anything else (``AttributeError``, ``RecursionError``, ...) would reach the user as a traceback.
"""

from __future__ import annotations

import csv
import io as text_io
import re
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from medseg import config, files
from medseg.data import exclusions, io, long_rle, rle
from medseg.errors import DataError, UsageError
from medseg.infer import submission

RLE_EXAMPLES = 2000
CSV_EXAMPLES = 500
CONFIG_EXAMPLES = 1000


def fuzz(examples: int) -> settings:
    """Many examples, no per-example deadline (the first pandas or pydantic call is slow to warm up)."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the files the generated inputs are written to (each example overwrites its file)."""
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------------
# RLE

orders = st.sampled_from(["F", "C"])
shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
any_shapes = st.one_of(
    shapes,
    st.tuples(st.integers(-3, 3), st.integers(-3, 3)),
    st.lists(st.integers(-2, 50), min_size=0, max_size=4).map(tuple),
)
rle_like_text = st.text(alphabet="0123456789 \t\n\r\v\f-+.,;e_x\x00\u0660\u00a0", max_size=60)


def decode_or_error(text, shape, order):
    """``decode``'s result, or the ``RLEError`` it raised; any other exception propagates (a bug)."""
    try:
        return rle.decode(text, shape, order=order)
    except rle.RLEError as error:
        assert isinstance(error, ValueError) and str(error)
        return error


def check_or_error(text, shape, order):
    try:
        rle.check(text, shape, order=order)
    except rle.RLEError as error:
        assert isinstance(error, ValueError) and str(error)
        return error
    return None


def assert_valid_mask(mask, text, shape, order) -> None:
    """A decoded mask has the shape asked for, is boolean, holds every run's pixels and re-encodes to itself."""
    assert isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == tuple(shape)
    values = [int(v) for v in text.split()]
    assert int(mask.sum()) == sum(values[1::2])
    again = rle.decode(rle.encode(mask, order=order), shape, order=order)
    np.testing.assert_array_equal(again, mask)


@fuzz(RLE_EXAMPLES)
@given(text=st.one_of(st.text(max_size=80), rle_like_text), shape=any_shapes, order=st.one_of(orders, st.text(max_size=2)))
@example(text="1 2 3", shape=(4, 4), order="F")
@example(text="99999999999999999999 1", shape=(4, 4), order="F")
@example(text="1 2", shape=(0, 4), order="F")
@example(text="", shape=(2, 2, 2), order="C")
def test_rle_on_arbitrary_text_raises_only_rle_error(text, shape, order):
    checked = check_or_error(text, shape, order)
    if len(shape) != 2 or min(shape, default=0) < 1 or order not in ("F", "C"):
        assert isinstance(checked, rle.RLEError)
        assert isinstance(decode_or_error(text, shape, order), rle.RLEError)
        return
    decoded = decode_or_error(text, shape, order)
    # check() and decode() accept exactly the same strings.
    assert isinstance(decoded, rle.RLEError) == isinstance(checked, rle.RLEError)
    if not isinstance(decoded, rle.RLEError):
        assert_valid_mask(decoded, text, shape, order)


@st.composite
def valid_runs(draw, shape):
    """Sorted, disjoint runs (some touching) that fit a frame of ``shape``, as a flat list of ints."""
    n_pixels = shape[0] * shape[1]
    values, position = [], 1
    for _ in range(draw(st.integers(0, 8))):
        start = position + draw(st.integers(0, 5))
        if start > n_pixels:
            break
        room = n_pixels - start + 1
        length = draw(st.one_of(st.integers(1, min(12, room)), st.integers(1, room)))  # short runs, or up to the end
        values += [start, length]
        position = start + length
    return values


corruptions = st.sampled_from(["set", "negate", "zero", "huge", "delete", "duplicate", "swap", "junk", "separator", "past_end", "none"])


@st.composite
def near_valid_rle(draw):
    shape = draw(shapes)
    values = draw(valid_runs(shape))
    tokens = [str(v) for v in values]
    applied = []
    for kind in draw(st.lists(corruptions, max_size=3)):
        applied.append(kind)
        if kind == "none":
            continue
        if kind == "past_end":
            tokens += [str(shape[0] * shape[1] + draw(st.integers(-2, 3))), str(draw(st.integers(1, 3)))]
            continue
        if kind == "separator":
            tokens = [t + draw(st.sampled_from(["", " ", "  ", "\t", "\n", ",", ";"])) for t in tokens]
            continue
        if not tokens:
            tokens = [draw(st.sampled_from(["", "0", "1", "-1", "x"]))]
            continue
        index = draw(st.integers(0, len(tokens) - 1))
        if kind == "set":
            tokens[index] = str(draw(st.integers(-5, shape[0] * shape[1] + 5)))
        elif kind == "negate":
            tokens[index] = "-" + tokens[index]
        elif kind == "zero":
            tokens[index] = "0"
        elif kind == "huge":
            tokens[index] = str(draw(st.integers(2**31, 2**80)))
        elif kind == "delete":
            del tokens[index]
        elif kind == "duplicate":
            tokens.insert(index, tokens[index])
        elif kind == "swap":
            other = draw(st.integers(0, len(tokens) - 1))
            tokens[index], tokens[other] = tokens[other], tokens[index]
        elif kind == "junk":
            position = draw(st.integers(0, len(tokens[index])))
            junk = draw(st.sampled_from(["a", ".", "+", "-", "e", "\x00", "\u0661", "1.5", "0x1"]))
            tokens[index] = tokens[index][:position] + junk + tokens[index][position:]
    separator = draw(st.sampled_from([" ", "  ", "\t", "\n"]))
    text = draw(st.sampled_from(["", " ", "\n"])) + separator.join(tokens) + draw(st.sampled_from(["", " ", "\n"]))
    return text, shape, values, [kind for kind in applied if kind != "none"]


@fuzz(RLE_EXAMPLES)
@given(case=near_valid_rle(), order=orders)
def test_rle_on_near_valid_runs_raises_only_rle_error(case, order):
    text, shape, values, applied = case
    checked = check_or_error(text, shape, order)
    decoded = decode_or_error(text, shape, order)
    assert isinstance(decoded, rle.RLEError) == isinstance(checked, rle.RLEError)
    if not applied:
        # Uncorrupted runs always decode, to exactly the pixels they list.
        assert not isinstance(decoded, rle.RLEError), f"valid RLE {text!r} for {shape} refused: {decoded}"
        assert int(decoded.sum()) == sum(values[1::2])
        flat = decoded.T.reshape(-1) if order == "F" else decoded.reshape(-1)
        for start, length in zip(values[0::2], values[1::2]):
            assert flat[start - 1 : start - 1 + length].all()
    if not isinstance(decoded, rle.RLEError):
        assert_valid_mask(decoded, text, shape, order)


@fuzz(RLE_EXAMPLES)
@given(
    shape=shapes,
    order=orders,
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]),
    blocky=st.booleans(),
)
def test_rle_encode_decode_round_trip_on_random_masks(shape, order, seed, density, blocky):
    rng = np.random.default_rng(seed)
    if blocky:  # a few rectangles, like real masks: long runs across column and row boundaries
        mask = np.zeros(shape, dtype=bool)
        for _ in range(rng.integers(0, 4)):
            top, left = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            mask[top : top + rng.integers(1, shape[0] + 1), left : left + rng.integers(1, shape[1] + 1)] = True
    else:
        mask = rng.random(shape) < density
    layout = np.asfortranarray(mask) if rng.integers(0, 2) else mask  # both memory layouts are encoded alike
    text = rle.encode(layout, order=order)
    rle.check(text, shape, order=order)
    np.testing.assert_array_equal(rle.decode(text, shape, order=order), mask)
    assert (text == "") == (not mask.any())
    flat = mask.T.reshape(-1) if order == "F" else mask.reshape(-1)
    values = [int(v) for v in text.split()]
    assert sum(values[1::2]) == int(mask.sum()) and all(flat[s - 1] for s in values[0::2])


# ---------------------------------------------------------------------------------------------------
# CSV readers

column_names = st.one_of(
    st.sampled_from(["img", "pixels", "id", "rle", "ImageId", "EncodedPixels", "subject", "IMG", "Pixels", ""]),
    st.text(max_size=8),
)
padded_names = st.tuples(st.sampled_from(["", " ", "  "]), column_names, st.sampled_from(["", " ", "\t"])).map("".join)
cells = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="0123456789 ", max_size=20),
    st.sampled_from(["", " ", '"', '""', "'", "\x00", "\n", "\r\n", "NaN", "NA", "null", "1 2", "1 2 3", "5 10 1 3"]),
)
encodings = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252", "utf-32"])
delimiters = st.sampled_from([",", ";", "\t", "|", " ", ",,"])
line_ends = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def csv_bytes(draw):
    """CSV-ish files: a header and rows of random width, random quoting, delimiter, line end and encoding."""
    delimiter, end = draw(delimiters), draw(line_ends)
    header = draw(st.lists(padded_names, min_size=0, max_size=5))
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=6), max_size=6))

    def line(fields):
        quoted = [f'"{f}"' if draw(st.booleans()) else f for f in fields]
        return delimiter.join(quoted)

    text = end.join([line(header), *map(line, rows)]) + draw(st.sampled_from(["", end, end * 2]))
    if draw(st.booleans()):
        position = draw(st.integers(0, len(text)))
        text = text[:position] + draw(st.sampled_from(["\x00", "\ufeff", "\ud800", "\u2028", '"', "\x1a"])) + text[position:]
    encoding = draw(encodings)
    # Lone surrogates written as bytes make invalid UTF-8; other codecs replace what they cannot encode.
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else draw(st.sampled_from(["replace", "ignore"])))


any_csv_bytes = st.one_of(csv_bytes(), st.binary(max_size=200))
required_columns = st.lists(st.sampled_from(["img", "pixels", "id", "rle", "subject"]), max_size=3, unique=True).map(tuple)


@fuzz(CSV_EXAMPLES)
@given(content=any_csv_bytes, required=required_columns)
@example(content=b"img, img,pixels\n1,1,\n", required=())
@example(content=b"a,b\n1\n", required=("a", "b"))
@example(content=b'"a\nb",c\n1,2\n', required=("z",))
def test_read_csv_raises_only_data_error(scratch, content, required):
    path = scratch / "table.csv"
    path.write_bytes(content)
    try:
        table = io.read_csv(path, required)
    except DataError as error:
        assert str(path) in str(error), f"the error does not name the file: {error}"
        return
    assert isinstance(table, pd.DataFrame)
    assert all(column in table.columns for column in required)
    assert all(isinstance(column, str) for column in table.columns)
    # Every caller looks columns up by name: two columns of one name make table[name] a DataFrame.
    assert len(set(table.columns)) == len(table.columns), f"duplicate column names {list(table.columns)}"
    for column in table.columns:
        assert all(isinstance(cell, str) for cell in table[column]), f"non-text cell in {column!r}"


@st.composite
def well_formed_tables(draw):
    """A header of unique names and rows of its width (any text but NUL and CR in the cells), as ``csv.writer`` writes them."""
    width = draw(st.integers(2, 4))
    name = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=8)
    header = draw(st.lists(name, min_size=width, max_size=width, unique=True))
    cell = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r"), max_size=10)
    rows = draw(st.lists(st.lists(cell, min_size=width, max_size=width), max_size=5))
    return header, rows


def csv_text(rows: list[list[str]]) -> str:
    buffer = text_io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


@fuzz(CSV_EXAMPLES)
@given(table=well_formed_tables(), extra=st.booleans())
@example(table=(["img", "pixels"], [["1", "100 20"], ["2", "300 40 500 10"]]), extra=True)
def test_read_csv_reads_a_well_formed_table_cell_for_cell(scratch, table, extra):
    """What a CSV writer wrote comes back as written; rows wider than the header are refused, not shifted."""
    header, rows = table
    if extra:  # one more field on every data row: a trailing comma, as some exports write
        rows = [[*row, ""] for row in rows]
        assume(rows)
    path = scratch / "written.csv"
    path.write_text(csv_text([header, *rows]), encoding="utf-8")
    if extra:
        with pytest.raises(DataError, match=re.escape(str(path))):
            io.read_csv(path, tuple(header))
        return
    read = io.read_csv(path, tuple(header))
    assert list(read.columns) == header
    assert read.values.tolist() == rows


submission_headers = st.one_of(
    st.sampled_from(["img,pixels", "id,rle", "ImageId,EncodedPixels", "IMG,Pixels", "pixels", "img", "pixels,img", "x,y,pixels"]),
    st.lists(padded_names, min_size=1, max_size=4).map(",".join),
)
rle_cells = st.one_of(
    st.text(alphabet="0123456789 ", max_size=16),
    st.lists(st.integers(0, 300), max_size=6).map(lambda v: " ".join(map(str, v))),
    cells,
)


@st.composite
def submission_text(draw):
    """Submission-ish CSV text: one of the known headers (or random names) and rows of id and RLE-ish cells."""
    header = draw(submission_headers)
    width = header.count(",") + 1
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        row_width = draw(st.sampled_from([width, width, width, width - 1, width + 1]))
        fields = [draw(st.sampled_from(["1", "2", "3", "1_1", "", " 2 "])) if i == 0 else draw(rle_cells) for i in range(max(row_width, 0))]
        rows.append(",".join(f'"{f}"' if ("," in f or "\n" in f or '"' in f) and draw(st.booleans()) else f for f in fields))
    return "\n".join([header, *rows]) + draw(st.sampled_from(["", "\n"]))


@fuzz(CSV_EXAMPLES)
@given(
    text=st.one_of(submission_text(), st.text(max_size=120)),
    sample=st.one_of(st.none(), submission_text()),
    sizes=st.one_of(st.none(), st.tuples(st.integers(1, 30), st.integers(1, 30))),
    train_had_masks=st.one_of(st.none(), st.booleans()),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1", "utf-16"]),
)
@example(text="img, img,pixels\n1,1,\n2,2,1 3\n", sample=None, sizes=None, train_had_masks=None, encoding="utf-8")
@example(text="img,pixels, pixels\n1,1 3,\n2,2 3,\n", sample=None, sizes=None, train_had_masks=None, encoding="utf-8")
def test_validate_file_raises_only_submission_errors(scratch, text, sample, sizes, train_had_masks, encoding):
    path = scratch / "submission.csv"
    path.write_bytes(text.encode(encoding, errors="replace"))
    sample_path = None
    if sample is not None:
        sample_path = scratch / "sample.csv"
        sample_path.write_text(sample, encoding="utf-8")
    try:
        report = submission.validate_file(path, sample=sample_path, sizes=sizes, train_had_masks=train_had_masks)
    except DataError as error:
        assert str(path) in str(error) or (sample_path is not None and str(sample_path) in str(error)), str(error)
        return
    assert isinstance(report, submission.SubmissionReport) and report.path == path
    assert 0 <= report.empty <= report.rows
    assert report.ok == (not report.problems and not report.degenerate)
    if sizes is None:
        assert not report.bounds_checked
    # The refusal step only ever raises SubmissionError, and exactly when the report is not ok.
    try:
        submission.check_or_raise(report, allow_degenerate=False, warn=lambda line: None)
    except submission.SubmissionError as error:
        assert not report.ok and str(path) in str(error)
    else:
        assert report.ok
    warned = []
    if not report.problems:
        submission.check_or_raise(report, allow_degenerate=True, warn=warned.append)
        assert len(warned) == len(report.degenerate)


# ---------------------------------------------------------------------------------------------------
# Configuration


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


LEAF_KEYS = _leaf_keys(config.Config().model_dump())
SECTION_KEYS = sorted({key.rsplit(".", 1)[0] for key in LEAF_KEYS if "." in key})


@st.composite
def dotted_keys(draw):
    """Real keys, sections, and keys with a part misspelt, dropped, added or emptied."""
    key = draw(st.sampled_from(LEAF_KEYS + SECTION_KEYS))
    parts = key.split(".")
    kind = draw(st.sampled_from(["real", "real", "misspelt", "extra", "drop", "empty", "case", "random"]))
    if kind == "misspelt":
        index = draw(st.integers(0, len(parts) - 1))
        parts[index] = parts[index][:-1] or "x"
    elif kind == "extra":
        parts.append(draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=6)))
    elif kind == "drop":
        parts = parts[1:] or ["x"]
    elif kind == "empty":
        parts.insert(draw(st.integers(0, len(parts))), "")
    elif kind == "case":
        parts = [part.upper() for part in parts]
    elif kind == "random":
        return draw(st.text(max_size=20))
    return ".".join(parts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
yaml_values = st.one_of(
    json_values.map(lambda value: yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()),
    st.sampled_from(
        [
            "",
            " ",
            "null",
            "~",
            "true",
            "no",
            "on",
            "1e3",
            "1_000",
            "0x1f",
            "0o17",
            ".inf",
            "-.nan",
            "2020-01-01",
            "[1, 2]",
            "{a: 1}",
            "{max_epochs: 2}",
            "!!python/name:os.system",
            "&a [*a]",
            "*b",
            "'unterminated",
            "[",
            "{",
            "- a",
            "a: b: c",
            "!!binary aGk=",
            "32",
            "64",
            "448",
            "0.5",
            "-1",
            "auto",
            "cpu",
            "none",
            "F",
            "C",
            "kaggle",
            "resnet18",
            "dice_bce",
        ]
    ),
    st.text(max_size=20),
)


@fuzz(CONFIG_EXAMPLES)
@given(
    pairs=st.lists(st.tuples(dotted_keys(), yaml_values), min_size=1, max_size=4),
    separator=st.sampled_from(["=", "=", " = ", ":", ""]),
    preset=st.sampled_from(["default", "cpu", "cpu", "gpu"]),
)
@example(pairs=[("data.layout", "{}"), ("data.layout", "kaggle")], separator="=", preset="cpu")
def test_load_config_overrides_raise_only_usage_error(pairs, separator, preset):
    overrides = [f"{key}{separator}{value}" for key, value in pairs]
    try:
        loaded = config.load_config(preset, overrides=overrides)
    except UsageError as error:
        assert str(error).strip()
        return
    assert isinstance(loaded, config.Config)
    # What loads, saves and reads back as the same configuration (RUN/config.yaml).
    assert config.Config.model_validate(loaded.model_dump()) == loaded


def _yaml_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


DEFAULTS = {preset: config.load_config(preset) for preset in ("default", "cpu")}


def _value_at(loaded: config.Config, key: str):
    node = loaded.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


@fuzz(CONFIG_EXAMPLES)
@given(key=st.sampled_from(LEAF_KEYS), first=yaml_values, preset=st.sampled_from(["default", "cpu"]))
@example(key="model.encoder", first="{a: 1}", preset="cpu")
def test_the_last_set_of_a_key_wins(key, first, preset):
    """``--set K=mistake --set K=fix`` is the configuration with the fix: a later --set replaces an earlier one."""
    default = DEFAULTS[preset]
    fixed = config.load_config(preset, overrides=[f"{key}={first}", f"{key}={_yaml_text(_value_at(default, key))}"])
    assert fixed == default


# Sections (real, nested-as-top-level, unknown) of keys (real leaf names or random text) with any values.
config_trees = st.dictionaries(
    st.sampled_from(SECTION_KEYS + ["trainer", "data", "bogus", ""]),
    st.dictionaries(st.text(max_size=12) | st.sampled_from([key.rsplit(".", 1)[-1] for key in LEAF_KEYS]), json_values, max_size=3),
    max_size=3,
)


@fuzz(CONFIG_EXAMPLES)
@given(
    content=st.one_of(
        config_trees.map(lambda tree: yaml.safe_dump(tree, allow_unicode=True).encode("utf-8")),
        json_values.map(lambda value: yaml.safe_dump(value).encode("utf-8")),
        st.text(max_size=80).map(lambda text: text.encode("utf-8", errors="surrogatepass")),
        st.binary(max_size=80),
    ),
)
@example(content=b"trainer:\n  max_epoch: 2\n")
@example(content=b"? [a, b]\n: 1\n")
@example(content=b"\xff\xfe")
def test_load_config_file_raises_only_usage_error(scratch, content):
    path = scratch / "config.yaml"
    path.write_bytes(content)
    try:
        loaded = config.load_config("cpu", config_file=path)
    except UsageError as error:
        assert str(error).strip()
        return
    assert isinstance(loaded, config.Config)
    assert loaded.input.height % 32 == 0 and loaded.input.width % 32 == 0


@fuzz(50)  # reaching the recursion limit takes PyYAML about a second: the deep cases are the explicit examples
@given(depth=st.integers(1, 300), bracket=st.sampled_from(["[]", "{}"]), through_file=st.booleans())
@example(depth=2000, bracket="[]", through_file=False)
@example(depth=2000, bracket="[]", through_file=True)
@example(depth=1000, bracket="{}", through_file=False)
def test_deeply_nested_yaml_values_raise_only_usage_error(scratch, depth, bracket, through_file):
    """``--set model.encoder=[[[[...]]]]`` (or the same in a config file) is a usage error, not a crash.

    A ``--set`` value that is not YAML is taken as text (as ``model.encoder=[`` is), so an encoder name
    made of brackets may also load; what must not happen is an exception other than ``UsageError``.
    """
    opening, closing = bracket
    value = opening * depth + closing * depth
    path = scratch / "nested.yaml"
    try:
        if through_file:
            path.write_text(f"model:\n  encoder: {value}\n")
            loaded = config.load_config(config_file=path)
        else:
            loaded = config.load_config(overrides=[f"model.encoder={value}"])
    except UsageError as error:
        # One line that points at the mistake: the key, or (for a file that cannot be parsed) the file.
        message = str(error)
        assert ("model.encoder" in message or (through_file and str(path) in message)) and "\n" not in message, message
    else:
        assert loaded.model.encoder == value, "a nested list or mapping was accepted as an encoder name"


# ---------------------------------------------------------------------------------------------------
# YAML reader (issue 31, hostile inputs): random YAML made of anchors, aliases, merge keys, tags, deep
# nesting, values Python cannot hold and plain text, through the parser every configuration, run config
# and search space goes through. Only UsageError may escape, fast, and what loads never expands.

YAML_EXAMPLES = 300
YAML_PIECES = [
    "&a ",
    "&b ",
    "*a",
    "*b",
    "[*a, *a, *a]",
    "<<: *a\n",
    "a: ",
    "b: ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "\n",
    "  ",
    "? ",
    "#c\n",
    "---\n",
    "...\n",
    "%YAML 1.1\n---\n",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGk=",
    "!!float ",
    "!!int ",
    "2020-13-45",
    "1" * 5000,
    ".nan",
    "-.inf",
    "'q'",
    '"\\x"',
    "|\n  x\n",
    "[" * 100,
    "trainer:\n  max_epochs: ",
    "optim.lr: {low: ",
    "{choices: [",
]
hostile_yaml = st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=8), max_size=12).map("".join)


@fuzz(YAML_EXAMPLES)
@given(text=hostile_yaml | st.text(max_size=120), reader=st.sampled_from(["text", "config", "space", "run_config"]))
@example(text="a: &a [1, 2]\nb: *a\n", reader="text")
@example(text="[" * 3000 + "]" * 3000, reader="config")
@example(text="optim.lr: {low: 1.0e-4, high: .inf}\n", reader="space")
@example(text="!!int ", reader="text")
@example(text="a: !!bool maybe", reader="config")
@example(text="a: !!timestamp soon", reader="run_config")
def test_yaml_readers_raise_only_usage_error_and_never_expand(scratch, text, reader):
    import time

    from medseg.sweep import space

    path = scratch / "hostile.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    readers = {
        "text": lambda: files.parse_yaml(text, "fuzz"),
        "config": lambda: config.load_config("cpu", config_file=path),
        "space": lambda: space.load_space(path),
        "run_config": lambda: config.read_run_config(path),
    }
    start = time.perf_counter()
    try:
        loaded = readers[reader]()
    except UsageError as error:
        assert str(error).strip() and "\n" not in str(error)
    else:
        if reader == "text":
            assert len(repr(loaded)) <= 50 * len(text) + 200, "a value larger than its text: something expanded"
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------------------------------
# CSV readers (issue 31, hostile inputs): headers that name a column twice (also once padded with blanks,
# which pandas would keep apart and medseg strips together) and one field up to megabytes long, through
# every CSV reader of the data layer: the table reader, long RLE tables and exclusions files. Only
# DataError or UsageError may escape, one line naming the file; a repeated name is always refused; an
# accepted table has each column once and its long field whole.

CSV_HEADER_EXAMPLES = 120
HUGE_FIELDS = st.sampled_from([0, 10, 200_000, 3_000_000])
repeating_names = st.sampled_from(["id", "class", "rle", "reason", "pixels", "img", "ID", " id", "rle ", "pixels.1", ""])


@st.composite
def headers_and_rows(draw):
    """A header of 1-5 names from a small pool (so names repeat often), and 0-3 rows of its width."""
    header = draw(st.lists(repeating_names, min_size=1, max_size=5))
    cell = st.text(st.characters(exclude_categories=["Cs"], exclude_characters='\x00\r"'), max_size=6)
    rows = draw(st.lists(st.lists(cell, min_size=len(header), max_size=len(header)), max_size=3))
    return header, rows


def _quoted_line(fields: list[str]) -> str:
    return ",".join(f'"{field}"' for field in fields)


@fuzz(CSV_HEADER_EXAMPLES)
@given(table=headers_and_rows(), huge=HUGE_FIELDS, reader=st.sampled_from(["table", "long", "exclusions"]))
@example(table=(["subject", "img", "pixels", "pixels"], [["1", "1", "", ""]]), huge=0, reader="table")
@example(table=(["id", "class", "rle", "class"], [["f", "nerve", "", "x"]]), huge=0, reader="long")
@example(table=(["id", "reason", "id"], [["1_1", "x", "1_1"]]), huge=0, reader="exclusions")
@example(table=(["id", "reason"], [["1_1", "x"]]), huge=3_000_000, reader="exclusions")
def test_csv_readers_refuse_repeated_columns_and_survive_huge_fields(scratch, table, huge, reader):
    header, rows = table
    if huge and rows:
        rows[0][-1] = "7 " * (huge // 2)
    path = scratch / "header.csv"
    path.write_text("\n".join(_quoted_line(row) for row in [header, *rows]) + "\n", encoding="utf-8")
    stripped = [name.strip() for name in header]
    repeated = len(set(filter(None, stripped))) < len([name for name in stripped if name])
    try:
        if reader == "table":
            read = io.read_csv(path, ())
        elif reader == "long":
            read = long_rle.read_long_table(path, long_rle.LONG_FORMATS[0])
        else:
            read = exclusions.read_exclusions(path)
    except (DataError, UsageError) as error:
        assert str(path) in str(error) and "\n" not in str(error), str(error)
        if repeated and reader == "table":
            assert "appears more than once in the header" in str(error)
        return
    assert not repeated, f"a header that names a column twice was accepted: {header}"
    if reader == "table":
        assert len(set(read.columns)) == len(read.columns) == len(header)
        assert [list(row) for row in read.values.tolist()] == rows
