"""Held-out predictions made once per run and kept (medseg.infer.kept): read back by tune, evaluate and report, tied
to the checkpoints, configuration, TTA and frames they came from, and giving the scores fresh predictions give."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.datasets import load_dataset
from medseg.errors import MedsegError, UsageError
from medseg.infer import heldout, kept
from medseg.infer.predict import Prediction
from medseg.infer.tune import THRESHOLDS
from medseg.learn.metrics import DEFAULT_THRESHOLD
from medseg.runs import KEPT_DIR, RUN_TREE, RunPlan, check_replaceable, open_run


class Counter:
    """Counts the frames the fold models predict (``heldout.predict_frames``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.frames = 0
        original = heldout.predict_frames

        def counting(models, frames, *args, **kwargs):
            self.frames += len(frames)
            yield from original(models, frames, *args, **kwargs)

        monkeypatch.setattr(heldout, "predict_frames", counting)


def held_out_count(run_path: Path) -> int:
    run = open_run(run_path)
    ids = [record.id for record in load_dataset(run.data, run.config.data).train]
    return sum(len(group) for group in heldout.oof_groups(run, ids).values())


@pytest.fixture
def two_folds(two_fold_run: Path, tmp_path: Path) -> Path:
    """A private copy of the 2-fold run and its data folder (``run.json`` points at the copy)."""
    data = tmp_path / "data"
    shutil.copytree(two_fold_run.parent / "data", data)
    run = tmp_path / "run"
    shutil.copytree(two_fold_run, run)
    plan = RunPlan.read(run / "run.json")
    plan.model_copy(update={"data": str(data.resolve())}).write(run / "run.json")
    return run


@pytest.fixture(scope="module")
def tuned_run(tiny_uns_run: Path, tmp_path_factory) -> Path:
    """The tiny uns-mini run, tuned once: its held-out predictions kept (``tune`` made them)."""
    run = tmp_path_factory.mktemp("tuned") / "run"
    shutil.copytree(tiny_uns_run, run, ignore=shutil.ignore_patterns("last.ckpt"))
    assert main(["tune", str(run), "--no-report", "--quiet"]) == 0
    return run


@pytest.fixture
def tuned(tuned_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tuned run, free to damage."""
    shutil.copytree(tuned_run, tmp_path / "run")
    return tmp_path / "run"


def test_quantised_probabilities_split_at_every_grid_threshold_where_the_originals_do():
    rng = np.random.default_rng(0)
    edges = np.arange(kept.LEVELS + 1) / kept.LEVELS
    near = np.concatenate([edges, np.nextafter(edges, -1), np.nextafter(edges, 2), np.float32(edges), np.float32(THRESHOLDS)])
    probs = np.concatenate([rng.random(200_000), np.clip(near, 0, 1)]).astype(np.float32)
    back = kept.dequantise(kept.quantise(probs))
    for threshold in [*THRESHOLDS, DEFAULT_THRESHOLD, 0.0, 1.0]:
        np.testing.assert_array_equal(back >= threshold, probs.astype(np.float64) >= threshold)
    assert kept.quantise(probs).dtype == np.uint8 and kept.quantise(probs).max() <= kept.LEVELS
    assert np.abs(back - probs).max() < 1 / kept.LEVELS


def test_tune_keeps_the_predictions_that_report_and_evaluate_then_read(run_copy, monkeypatch, capsys):
    counter = Counter(monkeypatch)
    assert main(["tune", str(run_copy), "--no-report"]) == 0
    frames = held_out_count(run_copy)
    assert counter.frames == frames
    assert (run_copy / KEPT_DIR / "fold_0.hflip.npz").is_file()
    assert main(["report", str(run_copy)]) == 0
    assert main(["evaluate", str(run_copy), str(open_run(run_copy).data)]) == 0
    assert counter.frames == frames  # each held-out frame predicted once in the run's life
    assert "predictions kept in held_out/fold_0.hflip.npz" in capsys.readouterr().err
    with zipfile.ZipFile(run_copy / KEPT_DIR / "fold_0.hflip.npz") as archive:
        assert len(archive.namelist()) == frames + 1 and kept.META in archive.namelist()
    with np.load(run_copy / KEPT_DIR / "fold_0.hflip.npz") as loaded:  # numpy reads it as an .npz
        steps = next(loaded[name] for name in loaded.files if name != kept.META.removesuffix(".npy"))
    assert steps.dtype == np.uint8 and steps.shape == (1, 420, 580)


def test_kept_and_fresh_predictions_give_byte_for_byte_the_same_files(run_copy, tmp_path):
    assert main(["tune", str(run_copy), "--no-report", "--quiet"]) == 0
    assert main(["evaluate", str(run_copy), str(open_run(run_copy).data), "--out", str(tmp_path / "read"), "--quiet"]) == 0
    tuned = (run_copy / "postprocess.json").read_bytes()
    shutil.rmtree(run_copy / KEPT_DIR)
    assert main(["evaluate", str(run_copy), str(open_run(run_copy).data), "--out", str(tmp_path / "fresh"), "--quiet"]) == 0
    assert main(["tune", str(run_copy), "--no-report", "--quiet", "--force"]) == 0
    assert (run_copy / "postprocess.json").read_bytes() == tuned
    for name in ("per_image.csv", "summary.json"):
        read, fresh = (tmp_path / "read" / name).read_text(), (tmp_path / "fresh" / name).read_text()
        assert read.replace(str(tmp_path / "read"), "OUT") == fresh.replace(str(tmp_path / "fresh"), "OUT")


def test_a_changed_checkpoint_has_only_its_own_fold_predicted_again(two_folds, monkeypatch, capsys):
    assert main(["tune", str(two_folds), "--no-report", "--quiet"]) == 0
    before = {fold: (two_folds / KEPT_DIR / f"fold_{fold}.hflip.npz").read_bytes() for fold in (0, 1)}
    best = two_folds / "fold_1" / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    name = next(key for key in checkpoint["state_dict"] if key.endswith("weight"))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] * 1.5  # a retrained fold: other weights
    torch.save(checkpoint, best)
    counter = Counter(monkeypatch)
    assert main(["report", str(two_folds)]) == 0
    run = open_run(two_folds)
    validation = heldout.oof_groups(run, [record.id for record in load_dataset(run.data, run.config.data).train])
    assert counter.frames == len(validation[1])
    assert "made from other checkpoints" in capsys.readouterr().err
    assert (two_folds / KEPT_DIR / "fold_0.hflip.npz").read_bytes() == before[0]
    assert (two_folds / KEPT_DIR / "fold_1.hflip.npz").read_bytes() != before[1]


def test_a_frame_changed_in_the_data_has_its_fold_predicted_again(two_folds, monkeypatch):
    assert main(["tune", str(two_folds), "--no-report", "--quiet"]) == 0
    run = open_run(two_folds)
    validation = heldout.oof_groups(run, [record.id for record in load_dataset(run.data, run.config.data).train])
    changed = validation[0][0]
    shutil.copyfile(run.data / "train" / f"{validation[1][0]}.tif", run.data / "train" / f"{changed}.tif")
    counter = Counter(monkeypatch)
    assert main(["tune", str(two_folds), "--no-report", "--quiet", "--force"]) == 0
    assert counter.frames == len(validation[0])


def test_another_tta_is_kept_beside_the_first(tuned, monkeypatch):
    counter = Counter(monkeypatch)
    assert main(["report", str(tuned), "--no-tta", "--quiet"]) == 0
    assert counter.frames == held_out_count(tuned)
    assert sorted(path.name for path in (tuned / KEPT_DIR).iterdir()) == ["fold_0.hflip.npz", "fold_0.none.npz"]


def _rewrite(path: Path, change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
    """Write a kept file again with its members (name to bytes) changed by ``change``."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in change(members).items():
            archive.writestr(name, content)


def _first_frame(members: dict[str, bytes]) -> str:
    return next(name for name in members if name.endswith(".npy"))


def _damage_member(path: Path, payload: np.ndarray) -> None:
    """Replace the first frame's member of a kept file with ``payload``."""
    stream = io.BytesIO()
    np.lib.format.write_array(stream, payload)
    _rewrite(path, lambda members: {**members, _first_frame(members): stream.getvalue()})


def _edit_meta(path: Path, edit: Callable[[dict], None]) -> None:
    """Change the kept file's ``kept.json`` in place with ``edit``."""

    def change(members: dict[str, bytes]) -> dict[str, bytes]:
        meta = json.loads(members[kept.META])
        edit(meta)
        return {**members, kept.META: json.dumps(meta).encode()}

    _rewrite(path, change)


def _first_presence(meta: dict, value: object) -> None:
    meta["presence"][next(iter(meta["presence"]))] = [value]


def _corrupt_deflate(path: Path) -> None:
    """Flip bytes in the middle of the first frame's deflated data (a damaged disk block)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(_first_frame(dict.fromkeys(archive.namelist(), b"")))
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for offset in range(start + info.compress_size // 3, start + info.compress_size // 3 + 64):
        data[offset] ^= 0xA5
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"not a zip"),
        lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
        lambda path: _damage_member(path, np.zeros((1, 10, 10), np.uint8)),
        lambda path: _damage_member(path, np.full((1, 420, 580), 241, np.uint8)),
        lambda path: _damage_member(path, np.zeros((1, 420, 580), np.float32)),
        lambda path: _damage_member(path, np.array([{"code": 1}], dtype=object)),
        lambda path: _rewrite(path, lambda members: {name: v for name, v in members.items() if name != kept.META}),
        lambda path: _rewrite(path, lambda members: {name: v for name, v in members.items() if name != _first_frame(members)}),
        _corrupt_deflate,
        lambda path: _edit_meta(path, lambda meta: meta["presence"].pop(next(iter(meta["presence"])))),
        lambda path: _edit_meta(path, lambda meta: _first_presence(meta, 1.5)),
        lambda path: _edit_meta(path, lambda meta: _first_presence(meta, float("nan"))),
    ],
    ids=[
        "not-a-zip",
        "truncated",
        "wrong-shape",
        "steps-above-240",
        "float-member",
        "pickled-object",
        "no-kept-json",
        "no-frame-member",
        "damaged-deflate",
        "presence-missing",
        "presence-above-1",
        "presence-nan",
    ],
)
def test_a_damaged_kept_file_is_predicted_again_and_replaced(tuned, monkeypatch, capsys, damage):
    tuning = (tuned / "postprocess.json").read_bytes()
    damage(tuned / KEPT_DIR / "fold_0.hflip.npz")
    counter = Counter(monkeypatch)
    assert main(["tune", str(tuned), "--no-report", "--force"]) == 0
    assert counter.frames == held_out_count(tuned)
    assert "does not read back" in capsys.readouterr().err
    assert (tuned / "postprocess.json").read_bytes() == tuning


def test_files_made_by_an_older_prediction_method_are_predicted_again(tuned, monkeypatch, capsys):
    _edit_meta(tuned / KEPT_DIR / "fold_0.hflip.npz", lambda meta: meta.update(method=kept.METHOD - 1))
    counter = Counter(monkeypatch)
    assert main(["tune", str(tuned), "--no-report", "--force"]) == 0
    assert counter.frames == held_out_count(tuned)
    assert "fold_0.hflip.npz was made from other checkpoints, settings or frames" in capsys.readouterr().err


def _constant(frames: list[np.ndarray], made: list[int], value: float = 0.3) -> Callable[[], Iterator[Prediction]]:
    """A ``predict`` for :func:`kept.kept_predictions` that records each call's frame count in ``made``."""

    def predict() -> Iterator[Prediction]:
        made.append(len(frames))
        return iter([Prediction(np.full((1, *frame.shape), value, np.float32), np.array([np.nan])) for frame in frames])

    return predict


def _kept(run_path: Path, ids: list[str], frames: list[np.ndarray], predict, tta: str = "hflip") -> Iterator[Prediction]:
    run = open_run(run_path)
    return kept.kept_predictions(run, "fold_0", run.folds, ids, frames, tta, predict, lambda line: None)


def test_a_deep_frame_changed_below_one_8_bit_step_is_predicted_again(tuned):
    frame = np.linspace(0.2, 0.8, 6 * 8, dtype=np.float32).reshape(6, 8)
    made: list[int] = []
    for frames in ([frame], [frame], [frame + np.float32(1e-4)]):  # 1e-4 is far below 1/255
        assert len(list(_kept(tuned, ["a"], frames, _constant(frames, made)))) == 1
    assert made == [1, 1]


def test_the_file_is_kept_when_the_consumer_takes_exactly_one_prediction_per_frame(tuned):
    frames = [np.zeros((4, 6), np.uint8), np.full((4, 6), 9, np.uint8)]
    made: list[int] = []
    predictions = _kept(tuned, ["a", "b"], frames, _constant(frames, made), tta="none")
    taken = [next(predictions), next(predictions)]
    assert open_run(tuned).kept_file("fold_0", "none").is_file() and len(taken) == 2
    assert [p.probs.max() for p in _kept(tuned, ["a", "b"], frames, _constant(frames, made), tta="none")] == [72 / 240] * 2
    assert made == [2]


def test_probabilities_that_are_not_finite_are_refused_and_the_kept_file_stays(tuned):
    path = tuned / KEPT_DIR / "fold_0.hflip.npz"
    before = path.read_bytes()
    frames = [np.zeros((4, 6), np.uint8)]
    with pytest.raises(MedsegError, match=r"probabilities predicted for x \(fold_0\) are not finite"):
        list(_kept(tuned, ["x"], frames, _constant(frames, [], value=float("nan"))))
    assert path.read_bytes() == before and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_run_folder_that_cannot_be_written_is_predicted_without_keeping(tuned, monkeypatch, capsys):
    tuning = (tuned / "postprocess.json").read_bytes()
    shutil.rmtree(tuned / KEPT_DIR)
    real_access = os.access  # a read-only held_out/ (root writes anywhere, so the test cannot just chmod it)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).name != KEPT_DIR and real_access(path, mode, **kw))
    counter = Counter(monkeypatch)
    assert main(["tune", str(tuned), "--no-report", "--force"]) == 0
    assert counter.frames == held_out_count(tuned) and "not keeping them: " in capsys.readouterr().err
    assert not any((tuned / KEPT_DIR).iterdir())
    assert (tuned / "postprocess.json").read_bytes() == tuning  # the same scores as from kept predictions


def test_the_report_after_tune_reads_what_tune_predicted_with_its_tta(tuned, monkeypatch):
    counter = Counter(monkeypatch)
    assert main(["tune", str(tuned), "--no-tta", "--force", "--quiet"]) == 0
    assert counter.frames == held_out_count(tuned)
    assert sorted(path.name for path in (tuned / KEPT_DIR).iterdir()) == ["fold_0.hflip.npz", "fold_0.none.npz"]


def test_a_report_alone_reads_the_predictions_of_the_tunings_tta(tuned, monkeypatch):
    counter = Counter(monkeypatch)
    assert main(["tune", str(tuned), "--no-tta", "--force", "--no-report", "--quiet"]) == 0
    assert main(["report", str(tuned), "--quiet"]) == 0  # no --tta flag: the tuning's, none
    assert counter.frames == held_out_count(tuned)  # tune predicted them; the report read them
    assert main(["report", str(tuned), "--tta", "--quiet"]) == 0  # asked for: the flip, kept already by the fixture
    assert counter.frames == held_out_count(tuned)


def test_a_replaced_kept_file_serves_again(tuned, monkeypatch):
    (tuned / KEPT_DIR / "fold_0.hflip.npz").write_bytes(b"not a zip")
    counter = Counter(monkeypatch)
    for _ in range(2):
        assert main(["tune", str(tuned), "--no-report", "--force", "--quiet"]) == 0
    assert counter.frames == held_out_count(tuned)


def test_a_link_in_place_of_a_kept_file_is_not_followed(tuned, tmp_path, monkeypatch):
    target = tuned / KEPT_DIR / "fold_0.hflip.npz"
    elsewhere = tmp_path / "elsewhere.npz"
    shutil.move(target, elsewhere)
    target.symlink_to(elsewhere)
    counter = Counter(monkeypatch)
    assert main(["tune", str(tuned), "--no-report", "--force", "--quiet"]) == 0
    assert counter.frames == held_out_count(tuned) and not target.is_symlink()


def test_kept_files_are_medsegs_for_force_and_foreign_ones_are_not(tuned):
    check_replaceable(tuned, RUN_TREE, "run.json", RunPlan)
    (tuned / KEPT_DIR / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="notes.txt"):
        check_replaceable(tuned, RUN_TREE, "run.json", RunPlan)


def test_the_kept_file_records_what_it_was_made_from(tuned_run):
    with zipfile.ZipFile(tuned_run / KEPT_DIR / "fold_0.hflip.npz") as archive:
        meta = json.loads(archive.read(kept.META))
    assert meta["group"] == "fold_0" and meta["tta"] == "hflip" and meta["levels"] == 240 and meta["structures"] == 1
    assert meta["checkpoints"] == {"0": kept.file_digest(tuned_run / "checkpoints" / "best.ckpt")}
    assert meta["config"] == kept.file_digest(tuned_run / "config.yaml")
    assert list(meta["frames"]) == list(meta["presence"]) and len(meta["frames"]) == held_out_count(tuned_run)
