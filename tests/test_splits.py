"""Tests for medseg.splits."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.data.splits import Split, SplitError, grouped_kfold, load_split, save_split


def realistic_case(seed: int = 0, n_subjects: int = 25) -> tuple[list[str], list[str], list[bool]]:
    """Return 25 subjects of about 10 frames each, about 35 % empty masks."""
    rng = np.random.default_rng(seed)
    ids, subjects, empty = [], [], []
    for subject in range(n_subjects):
        n_frames = int(rng.integers(8, 13))
        p_empty = float(rng.uniform(0.15, 0.55))
        for frame in range(n_frames):
            ids.append(f"sub{subject:02d}_frame{frame:02d}")
            subjects.append(f"sub{subject:02d}")
            empty.append(bool(rng.random() < p_empty))
    return ids, subjects, empty


@pytest.fixture
def case() -> tuple[list[str], list[str], list[bool]]:
    return realistic_case()


@pytest.fixture
def split(case: tuple[list[str], list[str], list[bool]]) -> Split:
    ids, subjects, empty = case
    return grouped_kfold(ids, subjects, empty, n_folds=5, seed=0)


def test_realistic_case_is_realistic(case):
    ids, subjects, empty = case
    assert len(set(subjects)) == 25
    assert 200 <= len(ids) <= 300
    assert 0.25 <= np.mean(empty) <= 0.45


def test_no_subject_in_two_folds(case, split):
    ids, subjects, _ = case
    subject_of = dict(zip(ids, subjects))
    folds_per_subject: dict[str, set[int]] = {}
    for fold, fold_ids in enumerate(split.folds):
        for sample_id in fold_ids:
            folds_per_subject.setdefault(subject_of[sample_id], set()).add(fold)
    assert len(folds_per_subject) == 25
    assert all(len(folds) == 1 for folds in folds_per_subject.values())


def test_every_sample_in_exactly_one_fold(case, split):
    ids, _, _ = case
    counts = Counter(sample_id for fold in split.folds for sample_id in fold)
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
    assert all(split.fold_of(sample_id) in range(5) for sample_id in ids)


def test_folds_keep_input_order(case, split):
    ids, _, _ = case
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    for fold in split.folds:
        positions = [position[sample_id] for sample_id in fold]
        assert positions == sorted(positions)
    assert split.ids == ids


def test_train_val_partitions_ids_in_input_order(case, split):
    ids, _, _ = case
    for fold in range(split.n_folds):
        train, val = split.train_val(fold)
        assert val == list(split.folds[fold])
        assert sorted(train + val) == sorted(ids)
        assert not set(train) & set(val)
        assert train == [sample_id for sample_id in ids if sample_id not in set(val)]


def test_same_seed_gives_same_split(case):
    ids, subjects, empty = case
    first = grouped_kfold(ids, subjects, empty, n_folds=5, seed=7)
    second = grouped_kfold(list(ids), list(subjects), list(empty), n_folds=5, seed=7)
    assert first == second
    assert first.folds == second.folds


def test_different_seeds_give_different_splits(case):
    ids, subjects, empty = case
    splits = {grouped_kfold(ids, subjects, empty, seed=seed).folds for seed in range(5)}
    assert len(splits) >= 4
    assert grouped_kfold(ids, subjects, empty, seed=0).folds != grouped_kfold(ids, subjects, empty, seed=1).folds


@pytest.mark.parametrize("data_seed", range(5))
@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_folds_are_balanced(data_seed, split_seed):
    ids, subjects, empty = realistic_case(data_seed)
    split = grouped_kfold(ids, subjects, empty, n_folds=5, seed=split_seed)
    is_empty = dict(zip(ids, empty))
    overall = np.mean(empty)
    target = len(ids) / 5
    for fold in split.folds:
        share = np.mean([is_empty[sample_id] for sample_id in fold])
        assert abs(share - overall) <= 0.15
        assert 0.75 * target <= len(fold) <= 1.25 * target


def test_balance_beats_size_only_assignment_on_skewed_subjects():
    ids, subjects, empty = [], [], []
    for subject in range(10):
        for frame in range(10):
            ids.append(f"s{subject}_f{frame}")
            subjects.append(f"s{subject}")
            empty.append(subject < 5)
    split = grouped_kfold(ids, subjects, empty, n_folds=5, seed=3)
    is_empty = dict(zip(ids, empty))
    for fold in split.folds:
        assert len(fold) == 20
        assert sum(is_empty[sample_id] for sample_id in fold) == 10


def test_none_and_blank_subjects_are_their_own_groups():
    ids = ["a", "b", "c", "d", "e", "f"]
    subjects = [None, None, "", "", "p1", "p1"]
    empty = [True, False, True, False, True, False]
    split = grouped_kfold(ids, subjects, empty, n_folds=5, seed=0)
    assert split.fold_of("e") == split.fold_of("f")
    assert sorted(len(fold) for fold in split.folds) == [1, 1, 1, 1, 2]


def test_missing_subject_never_joins_subject_named_like_its_id():
    ids = ["x", "y", "z"]
    subjects = [None, "x", "x"]
    split = grouped_kfold(ids, subjects, [False, True, False], n_folds=2, seed=0)
    assert split.fold_of("y") == split.fold_of("z")
    assert split.fold_of("x") != split.fold_of("y")


def test_numpy_inputs_are_accepted(case):
    ids, subjects, empty = case
    from_numpy = grouped_kfold(ids, np.array(subjects), np.array(empty), n_folds=np.int64(5), seed=0)
    assert from_numpy.folds == grouped_kfold(ids, subjects, empty, seed=0).folds


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": ["a", "b"]}, "pass one subject and one flag per id"),
        ({"subjects": ["s"] * 4}, "pass one subject and one flag per id"),
        ({"empty": [True] * 2}, "pass one subject and one flag per id"),
        ({"ids": ["a", "b", "a"], "empty": [True] * 3}, "'a'"),
        ({"n_folds": 1}, "--folds 2 or more"),
        ({"n_folds": 0}, "--folds 2 or more"),
        ({"n_folds": 2.0}, "integer"),
        ({"n_folds": 4}, "only 3 subjects.*lower --folds to at most 3"),
    ],
)
def test_bad_inputs_raise_split_error(kwargs, match):
    arguments = {
        "ids": ["a", "b", "c"],
        "subjects": ["s1", "s2", "s3"],
        "empty": [True, False, True],
        "n_folds": 2,
    }
    arguments.update(kwargs)
    with pytest.raises(SplitError, match=match):
        grouped_kfold(**arguments)


def test_duplicate_ids_are_named():
    ids = ["a", "b", "a", "c", "b"]
    with pytest.raises(SplitError) as info:
        grouped_kfold(ids, ["s"] * 5, [False] * 5, n_folds=2)
    message = str(info.value)
    assert "'a'" in message and "'b'" in message and "'c'" not in message
    assert "\n" not in message


def test_too_few_subjects_counts_groups():
    ids = [f"i{n}" for n in range(20)]
    subjects = ["p1"] * 10 + ["p2"] * 10
    with pytest.raises(SplitError, match="only 2 subjects.*--folds"):
        grouped_kfold(ids, subjects, [False] * 20, n_folds=5)


def test_single_subject_cannot_be_split():
    with pytest.raises(SplitError, match="only 1 subject.*at least 2 subjects"):
        grouped_kfold(["a", "b", "c"], ["p1"] * 3, [False] * 3, n_folds=2)


def test_split_error_is_value_error():
    assert issubclass(SplitError, ValueError)
    with pytest.raises(ValueError):
        grouped_kfold(["a"], ["s"], [True], n_folds=1)


@pytest.mark.parametrize("fold", [-1, 5, 17, True, "0", 1.0])
def test_train_val_rejects_bad_fold(split, fold):
    with pytest.raises(SplitError, match="from 0 to 4"):
        split.train_val(fold)


def test_fold_of_unknown_id_raises(split):
    with pytest.raises(SplitError, match="'nope' is not in this split"):
        split.fold_of("nope")


def test_split_rejects_inconsistent_construction():
    with pytest.raises(SplitError, match="folds 0 and 1"):
        Split(n_folds=2, seed=0, folds=(("a", "b"), ("b",)))
    with pytest.raises(SplitError, match="3 folds but n_folds is 2"):
        Split(n_folds=2, seed=0, folds=(("a",), ("b",), ("c",)))
    with pytest.raises(SplitError, match="list every fold id exactly once"):
        Split(n_folds=2, seed=0, folds=(("a",), ("b",)), order=("a", "c"))


def test_save_load_round_trip(tmp_path, case, split):
    ids, subjects, _ = case
    path = tmp_path / "nested" / "split.json"
    info = {"subjects": dict(zip(ids, subjects)), "empty_per_fold": np.arange(5)}
    save_split(split, path, extra=info)
    loaded = load_split(path, expected_ids=ids)
    assert loaded == split
    assert loaded.ids == ids
    assert loaded.train_val(2) == split.train_val(2)
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]


def test_saved_file_is_readable_json(tmp_path, split):
    path = tmp_path / "split.json"
    save_split(split, path, extra={"note": "fold sizes", "sizes": [1, 2]})
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    assert "\n  " in text
    assert data["n_folds"] == 5 and data["seed"] == 0
    assert [tuple(fold) for fold in data["folds"]] == list(split.folds)
    assert data["info"] == {"note": "fold sizes", "sizes": [1, 2]}


def test_save_overwrites_existing_file(tmp_path, case):
    ids, subjects, empty = case
    path = tmp_path / "split.json"
    save_split(grouped_kfold(ids, subjects, empty, seed=0), path)
    newer = grouped_kfold(ids, subjects, empty, seed=1)
    save_split(newer, path)
    assert load_split(path) == newer
    assert len(list(tmp_path.iterdir())) == 1


def test_save_rejects_unserialisable_extra_and_keeps_old_file(tmp_path, split):
    path = tmp_path / "split.json"
    save_split(split, path)
    before = path.read_text(encoding="utf-8")
    with pytest.raises(SplitError, match="extra"):
        save_split(split, path, extra={"bad": object()})
    assert path.read_text(encoding="utf-8") == before
    assert len(list(tmp_path.iterdir())) == 1


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(SplitError, match="absent.json.*not found"):
        load_split(path)


def test_load_corrupted_json_names_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"n_folds": 5, "folds": [', encoding="utf-8")
    with pytest.raises(SplitError, match="broken.json.*not valid JSON.*re-split"):
        load_split(path)


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"seed": 0, "folds": [["a"], ["b"]]},
        {"n_folds": "2", "seed": 0, "folds": [["a"], ["b"]]},
        {"n_folds": 2, "seed": True, "folds": [["a"], ["b"]]},
        {"n_folds": 2, "seed": 0, "folds": {"0": ["a"]}},
        {"n_folds": 2, "seed": 0, "folds": [["a"], [3]]},
        {"n_folds": 3, "seed": 0, "folds": [["a"], ["b"]]},
        {"n_folds": 2, "seed": 0, "folds": [["a"], ["b"]], "ids": ["a"]},
    ],
)
def test_load_wrong_structure_names_file(tmp_path, payload):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(SplitError, match="odd.json.*re-split") as info:
        load_split(path)
    assert "\n" not in str(info.value)


def test_load_id_in_two_folds_names_file_and_id(tmp_path):
    path = tmp_path / "twice.json"
    payload = {"n_folds": 2, "seed": 0, "folds": [["a", "b"], ["c", "a"]]}
    path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(SplitError, match="twice.json.*'a'.*folds 0 and 1"):
        load_split(path)


def test_load_without_ids_key_uses_fold_order(tmp_path):
    path = tmp_path / "plain.json"
    payload = {"n_folds": 2, "seed": 3, "folds": [["a", "c"], ["b"]]}
    path.write_text(json.dumps(payload), encoding="utf-8")
    split = load_split(path)
    assert split.seed == 3
    assert split.ids == ["a", "c", "b"]
    assert split.train_val(1) == (["a", "c"], ["b"])


def test_load_expected_ids_mismatch(tmp_path, case, split):
    ids, _, _ = case
    path = tmp_path / "split.json"
    save_split(split, path)
    changed = ids[7:] + [f"new{n}" for n in range(2)]
    with pytest.raises(SplitError) as info:
        load_split(path, expected_ids=changed)
    message = str(info.value)
    assert "split.json" in message
    assert "7 ids missing from the split" not in message
    assert "2 ids missing from the split ('new0', 'new1')" in message
    assert "7 unknown ids in the split" in message
    assert repr(ids[0]) in message and ", ..." in message
    assert "delete the file and re-split" in message


def test_load_expected_ids_in_other_order_is_fine(tmp_path, case, split):
    ids, _, _ = case
    path = tmp_path / "split.json"
    save_split(split, path)
    assert load_split(path, expected_ids=list(reversed(ids))) == split


@st.composite
def datasets(draw):
    n = draw(st.integers(min_value=2, max_value=40))
    ids = [f"id{i}" for i in range(n)]
    names = st.sampled_from(["p0", "p1", "p2", "id0"])
    subject = st.one_of(st.none(), st.just(""), names)
    subjects = draw(st.lists(subject, min_size=n, max_size=n))
    empty = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return ids, subjects, empty


def _n_groups(ids, subjects):
    return len({(s,) if s else ("id", i) for i, s in zip(ids, subjects)})


@settings(max_examples=150, deadline=None)
@given(data=datasets(), n_folds=st.integers(2, 6), seed=st.integers(0, 2**32 - 1))
def test_property_grouped_partition(data, n_folds, seed):
    ids, subjects, empty = data
    if _n_groups(ids, subjects) < n_folds:
        with pytest.raises(SplitError, match="only [0-9]+ subject"):
            grouped_kfold(ids, subjects, empty, n_folds=n_folds, seed=seed)
        return
    split = grouped_kfold(ids, subjects, empty, n_folds=n_folds, seed=seed)
    assert split.ids == ids
    assert sorted(sid for fold in split.folds for sid in fold) == sorted(ids)
    assert all(fold for fold in split.folds)
    for a, subject_a in zip(ids, subjects):
        for b, subject_b in zip(ids, subjects):
            if subject_a and subject_a == subject_b:
                assert split.fold_of(a) == split.fold_of(b)
    assert split == grouped_kfold(ids, subjects, empty, n_folds=n_folds, seed=seed)


def test_several_structures_balance_each_emptiness_pattern():
    """With one flag per structure the folds share out every pattern (nerve only, vessel only, both, none),
    where balancing "any mask" alone can pile one pattern into a fold."""
    ids, subjects, flags = [], [], []
    patterns = [(False, True)] * 20 + [(True, False)] * 20 + [(False, False)] * 20 + [(True, True)] * 20
    for index, pattern in enumerate(patterns):
        ids.append(f"f{index}")
        subjects.append(f"s{index // 2}")  # two frames per subject, of the same pattern
        flags.append(pattern)
    split = grouped_kfold(ids, subjects, flags, n_folds=4, seed=0)
    fold_of = {sample_id: fold for fold, members in enumerate(split.folds) for sample_id in members}
    for pattern in set(patterns):
        per_fold = Counter(fold_of[i] for i, flag in zip(ids, flags, strict=True) if flag == pattern)
        assert all(abs(per_fold[fold] - 5) <= 1 for fold in range(4)), (pattern, per_fold)
    any_mask = grouped_kfold(ids, subjects, [all(flag) for flag in flags], n_folds=4, seed=0)
    assert sorted(map(len, any_mask.folds)) == sorted(map(len, split.folds))


def test_one_flag_per_sample_and_one_structure_of_flags_split_alike():
    ids = [f"f{index}" for index in range(30)]
    subjects = [f"s{index // 3}" for index in range(30)]
    empty = [index % 4 == 0 for index in range(30)]
    assert grouped_kfold(ids, subjects, empty, n_folds=3).folds == grouped_kfold(ids, subjects, [[flag] for flag in empty], n_folds=3).folds
