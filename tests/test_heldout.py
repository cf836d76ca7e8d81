"""The one out-of-fold path that tune, evaluate and report share, and the report's gallery drawn from it."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.data.datasets import load_dataset
from medseg.infer import heldout
from medseg.infer.heldout import HeldOutFrame, held_out_frames
from medseg.infer.predict import Prediction
from medseg.report import page
from medseg.report.page import GalleryPicker
from medseg.runs import open_run


def test_every_frame_of_the_own_data_is_predicted_once_by_its_own_fold(run_copy):
    run = open_run(run_copy)
    dataset = load_dataset(run.data, run.config.data)
    frames = list(held_out_frames(run, dataset, out_of_fold=True, tta="none", on_message=lambda line: None))
    validation = heldout.oof_groups(run, [record.id for record in dataset.train])[0]
    assert [frame.id for frame in frames] == validation and {frame.fold for frame in frames} == {0}
    for frame in frames:
        assert frame.prediction.probs.shape == frame.truth.shape == (1, *frame.image.shape) and frame.truth.dtype == bool


def test_other_data_is_predicted_by_the_ensemble(run_copy, shared_data):
    run = open_run(run_copy)
    dataset = load_dataset(shared_data / "montgomery-cxr", run.config.data.model_copy(update={"mask_threshold": 127}))
    groups = heldout.held_out_groups(run, dataset.train, out_of_fold=False)
    assert list(groups) == [heldout.ENSEMBLE] and groups[heldout.ENSEMBLE] == [record.id for record in dataset.train]


def test_the_report_predicts_each_held_out_frame_once(run_copy, monkeypatch):
    """The gallery is drawn from the predictions the scores came from, not predicted a second time."""
    predicted: list[int] = []
    original = heldout.predict_frames

    def counting(models, frames, *args, **kwargs):
        predicted.append(len(frames))
        yield from original(models, frames, *args, **kwargs)

    monkeypatch.setattr(heldout, "predict_frames", counting)
    page.build_report(page.ReportRequest(run_copy), on_message=lambda line: None)
    held_out = len(heldout.oof_groups(open_run(run_copy), _ids(run_copy))[0])
    assert sum(predicted) == held_out
    assert len(list((run_copy / "report").glob("gallery_*.png"))) == min(held_out, page.GALLERY_WORST + page.GALLERY_RANDOM)


def _ids(run_path) -> list[str]:
    run = open_run(run_path)
    return [record.id for record in load_dataset(run.data, run.config.data).train]


def scored(index: int, dice: float) -> tuple[HeldOutFrame, dict]:
    frame = HeldOutFrame(
        f"f{index}",
        0,
        np.zeros((2, 2), np.uint8),
        np.zeros((1, 2, 2), bool),
        Prediction(np.zeros((1, 2, 2), np.float32), np.full(1, np.nan)),
    )
    return frame, {"id": frame.id, "dice": dice}


def test_the_gallery_keeps_the_worst_frames_and_few_others():
    picker = GalleryPicker(worst=3, random=2, seed=1)
    dice = np.random.default_rng(0).random(200)
    for index, value in enumerate(dice):
        picker.offer(*scored(index, float(value)))
        assert len(picker._kept) <= 3 + 3 + 2  # never more than the worst and the lowest keys in memory
    worst, lucky = picker.chosen()
    assert [row["dice"] for _, row in worst] == sorted(dice)[:3]
    assert len(lucky) == 2 and not {row["id"] for _, row in lucky} & {row["id"] for _, row in worst}
    assert [row["dice"] for _, row in lucky] == sorted(row["dice"] for _, row in lucky)


def test_the_gallery_choice_among_the_rest_is_uniform():
    """Each of the frames that are not the worst is picked about equally often over many seeds."""
    counts = np.zeros(10)
    for seed in range(2000):
        picker = GalleryPicker(worst=2, random=2, seed=seed)
        for index in range(12):
            picker.offer(*scored(index, index / 12))
        counts[[int(row["id"][1:]) - 2 for _, row in picker.chosen()[1]]] += 1
    assert counts.sum() == 4000
    assert counts == pytest.approx(np.full(10, 400), rel=0.15)


def test_a_small_set_shows_every_frame_once():
    picker = GalleryPicker(worst=12, random=12)
    for index in range(8):
        picker.offer(*scored(index, 1 - index / 8))
    worst, lucky = picker.chosen()
    assert len(worst) == 8 and lucky == [] and [row["id"] for _, row in worst] == [f"f{i}" for i in range(7, -1, -1)]
