"""Subject-grouped K-fold splits, balanced for the share of empty masks.

Samples are grouped by subject so that no subject's frames appear in two
folds. Groups are assigned greedily, largest first, to the fold that keeps
both the fold sizes and the per-fold share of empty masks closest to even.
Splits are deterministic for a given seed and can be saved to and read from a
human-readable JSON file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError, UsageError
from medseg.files import MAX_TEXT_BYTES, atomic_write, read_bounded

__all__ = [
    "Split",
    "SplitError",
    "grouped_kfold",
    "load_split",
    "save_split",
]

_SHOW_IDS = 5
_FORMAT_VERSION = 1


class SplitError(MedsegError, ValueError):
    """A split cannot be made, saved or loaded because of a user mistake."""


@dataclass(frozen=True)
class Split:
    """A K-fold split of sample ids.

    Attributes:
        n_folds: Number of folds.
        seed: Seed the split was made with.
        folds: Validation ids of each fold, each in the input order of ids.
        order: Every id in the order given at creation. Defaults to the folds
            concatenated when left empty.
    """

    n_folds: int
    seed: int
    folds: tuple[tuple[str, ...], ...]
    order: tuple[str, ...] = ()
    _fold_index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        folds = tuple(tuple(fold) for fold in self.folds)
        object.__setattr__(self, "folds", folds)
        _check_n_folds(self.n_folds)
        if len(folds) != self.n_folds:
            raise SplitError(f"split has {len(folds)} folds but n_folds is {self.n_folds}; make both agree")
        index = _fold_index(folds)
        order = tuple(self.order) or tuple(sid for fold in folds for sid in fold)
        _check_order(order, index)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "_fold_index", index)

    @property
    def ids(self) -> list[str]:
        """Every id, in the order given at creation."""
        return list(self.order)

    def fold_of(self, sample_id: str) -> int:
        """Return the fold whose validation set holds a sample.

        Args:
            sample_id: Id of the sample.

        Returns:
            The fold number, from 0 to n_folds - 1.

        Raises:
            SplitError: If the id is not in the split.
        """
        try:
            return self._fold_index[sample_id]
        except KeyError:
            raise SplitError(f"sample id {sample_id!r} is not in this split; check the id or re-split the data set") from None

    def train_val(self, fold: int) -> tuple[list[str], list[str]]:
        """Return the training and validation ids of one fold.

        Args:
            fold: Fold number, from 0 to n_folds - 1.

        Returns:
            The training ids (all other folds) and the validation ids, both in
            the order given at creation.

        Raises:
            SplitError: If the fold number is out of range.
        """
        if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < self.n_folds:
            raise SplitError(f"fold {fold!r} does not exist; choose a fold from 0 to {self.n_folds - 1}")
        train = [sid for sid in self.order if self._fold_index[sid] != fold]
        val = [sid for sid in self.order if self._fold_index[sid] == fold]
        return train, val


def grouped_kfold(
    ids: Sequence[str],
    subjects: Sequence[str | None],
    empty: Sequence[bool] | Sequence[Sequence[bool]],
    n_folds: int = 5,
    seed: int = 0,
) -> Split:
    """Split samples into folds grouped by subject and balanced for empty masks.

    Groups (subjects; a sample without a subject is its own group) are
    shuffled with the seed, stably sorted by size, largest first, and each is
    given to the fold that minimises the spread of fold sizes plus the
    deviation of the folds' empty-mask shares from the overall share. With
    several structures per sample the shares balanced are those of each
    emptiness pattern (which structures a sample has), not only "any mask".

    Args:
        ids: Unique sample ids.
        subjects: Subject of each sample; None or "" when unknown.
        empty: Whether each sample's mask is empty; with several structures,
            one flag per structure for each sample.
        n_folds: Number of folds, at least 2.
        seed: Seed for shuffling groups of equal size.

    Returns:
        The split.

    Raises:
        SplitError: If the lengths differ, ids repeat, n_folds is below 2 or
            there are fewer groups than folds.
    """
    _check_inputs(ids, subjects, empty)
    _check_n_folds(n_folds)
    groups = _group_indices(ids, subjects)
    _check_enough_groups(len(groups), n_folds)
    strata = _strata(empty)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    n_empty = np.stack([strata[g].sum(axis=0) for g in groups]).astype(np.int64)
    group_fold = _assign_groups(sizes, n_empty, n_folds, seed)
    sample_fold = np.empty(len(ids), dtype=np.int64)
    for members, fold in zip(groups, group_fold):
        sample_fold[members] = fold
    folds = tuple(tuple(ids[i] for i in np.flatnonzero(sample_fold == fold)) for fold in range(n_folds))
    return Split(n_folds=n_folds, seed=seed, folds=folds, order=tuple(ids))


def save_split(split: Split, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write a split to a JSON file atomically.

    Args:
        split: The split to save.
        path: Destination file; its folder is created when missing.
        extra: JSON-serialisable details (for example subjects per id or empty
            counts per fold), stored under "info".

    Raises:
        SplitError: If extra cannot be written as JSON.
    """
    path = Path(path)
    payload = {
        "version": _FORMAT_VERSION,
        "n_folds": split.n_folds,
        "seed": split.seed,
        "ids": list(split.order),
        "folds": [list(fold) for fold in split.folds],
        "info": extra if extra is not None else {},
    }
    try:
        text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as err:
        raise SplitError(
            f"cannot write split info to {path} as JSON ({err}); pass only numbers, strings, lists and dicts in extra"
        ) from None
    with atomic_write(path) as stream:
        stream.write(text)


def load_split(path: Path, expected_ids: Sequence[str] | None = None) -> Split:
    """Read and validate a split saved by save_split.

    Args:
        path: The split file.
        expected_ids: Ids of the current data set; when given, the split must
            hold exactly these ids.

    Returns:
        The split.

    Raises:
        SplitError: If the file is missing, is not JSON, has the wrong
            structure, holds an id twice or does not match expected_ids.
    """
    path = Path(path)
    data = _read_json(path)
    split = _split_from_json(data, path)
    if expected_ids is not None:
        _check_expected(split, expected_ids, path)
    return split


def _check_inputs(ids: Sequence[str], subjects: Sequence[str | None], empty: Sequence[bool]) -> None:
    """Check that the per-sample inputs agree in length and ids are unique."""
    if not len(ids) == len(subjects) == len(empty):
        raise SplitError(f"got {len(ids)} ids, {len(subjects)} subjects and {len(empty)} empty flags; pass one subject and one flag per id")
    repeated = [sid for sid, count in Counter(ids).items() if count > 1]
    if repeated:
        raise SplitError(f"{len(repeated)} sample ids occur more than once ({_preview(repeated)}); make every id unique")


def _check_n_folds(n_folds: int) -> None:
    """Check that the number of folds is an integer of at least 2."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)):
        raise SplitError(f"n_folds must be an integer, got {n_folds!r}; use --folds 5")
    if n_folds < 2:
        raise SplitError(f"n_folds is {n_folds}; use --folds 2 or more")


def _check_enough_groups(n_groups: int, n_folds: int) -> None:
    """Check that there are at least as many groups as folds."""
    if n_groups < 2:
        raise SplitError(f"only {n_groups} subject (group) in the data; a split needs samples from at least 2 subjects")
    if n_groups < n_folds:
        raise SplitError(f"only {n_groups} subjects (groups) for {n_folds} folds; lower --folds to at most {n_groups}")


def _group_key(sample_id: str, subject: str | None) -> Hashable:
    """Return the grouping key: the subject, or the id itself when unknown."""
    if subject is None or subject == "":
        return ("sample", sample_id)
    return ("subject", subject)


def _strata(empty: Sequence[bool] | Sequence[Sequence[bool]]) -> np.ndarray:
    """The indicators whose shares the folds balance, one row per sample.

    One structure: whether the mask is empty. Several: one indicator per emptiness pattern that occurs.

    Shape:
        Returns: (N, K).
    """
    flags = np.array([np.atleast_1d(np.asarray(value, dtype=bool)) for value in empty], dtype=bool).reshape(len(empty), -1)
    if flags.shape[1] == 1:
        return flags
    patterns, which = np.unique(flags, axis=0, return_inverse=True)
    return np.eye(len(patterns), dtype=bool)[which.reshape(-1)]


def _group_indices(ids: Sequence[str], subjects: Sequence[str | None]) -> list[np.ndarray]:
    """Return the sample indices of each group, groups in order of first use."""
    members: dict[Hashable, list[int]] = {}
    for index, (sample_id, subject) in enumerate(zip(ids, subjects)):
        members.setdefault(_group_key(sample_id, subject), []).append(index)
    return [np.array(indices, dtype=np.int64) for indices in members.values()]


def _assign_groups(sizes: np.ndarray, n_empty: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Assign each group to a fold, largest groups first.

    Args:
        sizes: Number of samples in each group.
        n_empty: Number of samples of each balanced kind (:func:`_strata`) in each group.
        n_folds: Number of folds.
        seed: Seed for the shuffle that orders groups of equal size.

    Returns:
        The fold of each group.

    Shape:
        sizes: (G,). n_empty: (G, K).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    target = sizes.sum() / n_folds
    share = n_empty.sum(axis=0) / sizes.sum()
    fold_sizes = np.zeros(n_folds)
    fold_empty = np.zeros((n_folds, n_empty.shape[1]))
    group_fold = np.empty(len(sizes), dtype=np.int64)
    for group in order:
        fold = _best_fold(fold_sizes, fold_empty, sizes[group], n_empty[group], target, share)
        fold_sizes[fold] += sizes[group]
        fold_empty[fold] += n_empty[group]
        group_fold[group] = fold
    return group_fold


def _best_fold(
    fold_sizes: np.ndarray,
    fold_empty: np.ndarray,
    size: int,
    n_empty: np.ndarray,
    target: float,
    share: np.ndarray,
) -> int:
    """Return the fold where adding a group gives the lowest cost.

    While some folds are still empty only those are candidates, so every
    fold gets at least one group. The cost is the spread of fold sizes plus
    the summed excess of empty masks over the overall share, both divided by
    the target fold size. Ties go to the smallest fold, then the lowest fold
    number.
    """
    excess = np.abs(fold_empty - share * fold_sizes[:, None]).sum(axis=1)
    new_excess = np.abs(fold_empty + n_empty - share * (fold_sizes + size)[:, None]).sum(axis=1)
    unused = np.flatnonzero(fold_sizes == 0)
    candidates = unused if unused.size else np.arange(len(fold_sizes))
    costs = []
    for fold in candidates:
        sizes_after = fold_sizes.copy()
        sizes_after[fold] += size
        spread = sizes_after.max() - sizes_after.min()
        imbalance = excess.sum() - excess[fold] + new_excess[fold]
        cost = round(float((spread + imbalance) / target), 9)
        costs.append((cost, fold_sizes[fold], int(fold)))
    return min(costs)[2]


def _fold_index(folds: tuple[tuple[str, ...], ...]) -> dict[str, int]:
    """Map each id to its fold, rejecting ids that occur twice."""
    index: dict[str, int] = {}
    for fold, fold_ids in enumerate(folds):
        for sample_id in fold_ids:
            if not isinstance(sample_id, str):
                raise SplitError(f"sample id {sample_id!r} in fold {fold} is not a string; use string ids")
            if sample_id in index:
                where = f"folds {index[sample_id]} and {fold}" if index[sample_id] != fold else f"fold {fold} twice"
                raise SplitError(f"sample id {sample_id!r} is in {where}; every id must be in exactly one fold")
            index[sample_id] = fold
    return index


def _check_order(order: tuple[str, ...], index: dict[str, int]) -> None:
    """Check that the id order lists exactly the ids of the folds, once each."""
    if len(order) != len(index) or set(order) != index.keys():
        raise SplitError(
            f"the id list has {len(order)} entries but the folds hold {len(index)} different ids; list every fold id exactly once"
        )


def _preview(values: Sequence[str]) -> str:
    """Return the first few values, comma-separated, with an ellipsis if cut."""
    shown = ", ".join(repr(v) for v in values[:_SHOW_IDS])
    return shown + (", ..." if len(values) > _SHOW_IDS else "")


def _json_default(value: Any) -> Any:
    """Convert numpy values and paths for json.dumps."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _read_json(path: Path) -> Any:
    """Read a JSON file, turning every read or parse failure into SplitError."""
    try:
        text = read_bounded(path, MAX_TEXT_BYTES, "split file")
    except FileNotFoundError:
        raise SplitError(f"split file {path} not found; create it with the split step or check the path") from None
    except (OSError, UsageError) as err:
        raise SplitError(f"cannot read split file {path} ({err}); delete it and re-split") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SplitError(f"split file {path} is not valid JSON ({err.msg}, line {err.lineno}); delete it and re-split") from None
    except RecursionError:
        raise SplitError(f"split file {path} is nested too deeply to be a split; delete it and re-split") from None


def _split_from_json(data: Any, path: Path) -> Split:
    """Build a Split from parsed JSON, naming the file in every error."""
    problem = _structure_problem(data)
    if problem:
        raise SplitError(f"split file {path} has the wrong structure ({problem}); delete it and re-split")
    try:
        return Split(
            n_folds=data["n_folds"],
            seed=data["seed"],
            folds=tuple(tuple(fold) for fold in data["folds"]),
            order=tuple(data.get("ids", ())),
        )
    except SplitError as err:
        raise SplitError(f"split file {path} is invalid ({err}); delete it and re-split") from None


def _structure_problem(data: Any) -> str:
    """Describe what is wrong with the shape of split JSON, or return ""."""
    if not isinstance(data, dict):
        return f"expected an object, found {type(data).__name__}"
    for key in ("n_folds", "seed"):
        if key not in data:
            return f"missing {key!r}"
        if isinstance(data[key], bool) or not isinstance(data[key], int):
            return f"{key!r} is not an integer"
    folds = data.get("folds")
    if not isinstance(folds, list) or not all(isinstance(f, list) for f in folds):
        return "'folds' is not a list of id lists"
    if not all(isinstance(sid, str) for fold in folds for sid in fold):
        return "'folds' holds a non-string id"
    ids = data.get("ids", [])
    if not isinstance(ids, list) or not all(isinstance(sid, str) for sid in ids):
        return "'ids' is not a list of strings"
    return ""


def _check_expected(split: Split, expected_ids: Sequence[str], path: Path) -> None:
    """Check that a loaded split holds exactly the expected ids."""
    expected = list(dict.fromkeys(expected_ids))
    known = set(split.order)
    wanted = set(expected)
    missing = [sid for sid in expected if sid not in known]
    unknown = [sid for sid in split.order if sid not in wanted]
    if not missing and not unknown:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} ids missing from the split ({_preview(missing)})")
    if unknown:
        parts.append(f"{len(unknown)} unknown ids in the split ({_preview(unknown)})")
    raise SplitError(f"split file {path} does not match the data set: {' and '.join(parts)}; delete the file and re-split")
