"""The presence head, presence-aware tuning, cross-fitted tuning and the ``kaggle`` preset, on the CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, read_rows, set_args
from medseg import runs
from medseg.cli import main
from medseg.config import ModelConfig, load_config
from medseg.data import splits
from medseg.data.datasets import sample_data_path
from medseg.infer.export import OnnxEnsemble
from medseg.infer.predict import PostProcess, Prediction, load_fold_model, predict_frames, read_postprocess
from medseg.infer.tune import OofPredictions, best_point, cross_fitted_counts, frame_counts, grids, oof_predictions, score_cube
from medseg.learn import metrics
from medseg.learn.losses import create_loss
from medseg.learn.models import create_model, split_outputs
from medseg.runs import open_run

PRESENCE = ("model.presence_head=true", "model.encoder=resnet18")


def train_tiny(folder: Path, preset: str, epochs: int) -> Path:
    """A run with a presence head trained with tiny settings on the bundled sample through the command line."""
    run = folder / "run"
    args = ["train", str(sample_data_path()), "--out", str(run), "--preset", preset, "--quiet", "--no-report"]
    assert main(args + set_args(*TINY_OVERRIDES, *PRESENCE, f"trainer.max_epochs={epochs}")) == 0
    return run


@pytest.fixture(scope="module")
def presence_run(tiny_sample_run) -> Path:
    """A single run with a presence head, 2 tiny epochs: the session's ``tiny_sample_run`` (read it; copy it to change it).

    Returns:
        The run folder, whose model is the one :data:`PRESENCE` asks for (the cpu preset's).
    """
    model = load_config("cpu", overrides=[*TINY_OVERRIDES, *PRESENCE]).model
    assert open_run(tiny_sample_run).config.model == model and model.presence_head and model.encoder == "resnet18"
    return tiny_sample_run


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory) -> Path:
    """``--preset kaggle`` with tiny settings (the sample has 5 subjects, so 5 folds of one subject)."""
    return train_tiny(tmp_path_factory.mktemp("kaggle"), "kaggle", epochs=1)


def test_presence_head_adds_a_logit_per_frame_and_a_loss_term():
    model, _ = create_model(ModelConfig(encoder="resnet18", encoder_weights="none", presence_head=True))
    logits, presence = split_outputs(model(torch.rand(3, 1, 64, 96)))
    assert logits.shape == (3, 1, 64, 96) and presence.shape == (3,)
    target = torch.zeros(3, 1, 64, 96)
    target[0, 0, 10:20, 10:20] = 1
    config = load_config("cpu")
    with_head = create_loss(config.loss)
    without = create_loss(config.loss.model_copy(update={"presence_weight": 0.0}))
    outputs = model(torch.rand(3, 1, 64, 96))
    loss = with_head(outputs, target)
    assert loss > without(outputs, target)
    loss.backward()
    assert model.classification_head[3].weight.grad.abs().sum() > 0


def test_presence_head_trains_and_its_probability_reaches_predictions(presence_run):
    run = open_run(presence_run)
    checkpoint = torch.load(run.folds[0].best, map_location="cpu", weights_only=False)
    assert any(key.startswith("model.classification_head.") for key in checkpoint["state_dict"])
    frames = [np.full((420, 580), value, np.uint8) for value in (0, 90, 200)]
    predictions = list(predict_frames([load_fold_model(run, run.folds[0], torch.device("cpu"))], frames, run.config))
    assert all(p.presence.shape == (1,) and 0.0 <= p.presence[0] <= 1.0 for p in predictions)
    assert read_postprocess(run) == [PostProcess(presence_threshold=0.5)]


def test_presence_threshold_one_empties_every_mask_and_zero_switches_it_off():
    probs = np.full((20, 30), 0.9, np.float32)
    assert not PostProcess(presence_threshold=1.0).apply(probs, presence=1.0).any()
    assert not Prediction(probs[None], np.array([0.999])).mask([PostProcess(presence_threshold=1.0)]).any()
    assert PostProcess(presence_threshold=0.0).apply(probs, presence=0.0).all()
    assert PostProcess(presence_threshold=0.5).apply(probs, presence=0.51).all()
    assert not PostProcess(presence_threshold=0.5).apply(probs, presence=0.5).any()
    assert PostProcess(presence_threshold=0.5).apply(probs, presence=math.nan).all()  # no head: no presence decision


def test_tuning_a_presence_run_searches_presence_and_never_scores_below_untuned(presence_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(presence_run, run)
    assert main(["tune", str(run), "--quiet", "--no-report"]) == 0
    assert "presence above" in capsys.readouterr().out
    tuned = json.loads((run / "postprocess.json").read_text())
    assert tuned["presence_head"] and tuned["score_after"] >= tuned["score_before"]
    assert 1.0 in tuned["presence_thresholds"] and len(tuned["presence_scores"]) == len(tuned["presence_thresholds"])
    assert np.max(tuned["scores"]) == pytest.approx(tuned["score_after"], abs=1e-6)
    assert read_postprocess(open_run(run))[0].presence_threshold == tuned["presence_threshold"]


def test_grids_always_hold_the_untuned_setting():
    thresholds, areas, presence = grids(True, np.array([0.3, 0.7]), np.array([100]), np.array([0.9]))
    assert 0.5 in thresholds and 0 in areas and 0.5 in presence
    assert grids(False, np.array([0.3]), np.array([100]), np.array([0.9]))[2].tolist() == [0.0]


def fabricated_oof(rng: np.random.Generator, n: int = 40) -> OofPredictions:
    """Frames whose right presence threshold is 0.5: half empty with presence 0.2-0.45, half not with 0.55-0.9."""
    thresholds = np.array([0.3, 0.5, 0.7])
    truth_area = np.where(np.arange(n) % 2 == 0, 0, 400)
    counts = np.zeros((len(thresholds), n, 3), dtype=np.int64)
    for t in range(len(thresholds)):
        counts[t, :, 0] = np.where(truth_area > 0, 300 + 20 * t, 0)  # tp
        counts[t, :, 1] = np.where(truth_area > 0, 40 - 10 * t, 150)  # fp: a false blob on every empty frame
        counts[t, :, 2] = truth_area - counts[t, :, 0] * (truth_area > 0)
    presence = np.where(truth_area > 0, rng.uniform(0.55, 0.9, n), rng.uniform(0.2, 0.45, n))
    return OofPredictions([f"f{i}" for i in range(n)], counts, presence)


def test_cross_fitted_tuning_scores_each_fold_with_a_setting_chosen_without_it():
    oof = fabricated_oof(np.random.default_rng(0))
    thresholds, areas, presence = np.array([0.3, 0.5, 0.7]), np.array([0, 200]), np.array([0.0, 0.5, 0.95])
    fold_of = {i: k % 5 for k, i in enumerate(oof.ids)}
    cube = score_cube(oof, areas, presence)
    chosen = best_point(cube, thresholds, areas, presence)
    tuned_on_all = metrics.competition_score(frame_counts(oof, chosen, thresholds))
    assert tuned_on_all == pytest.approx(cube.max())
    honest = metrics.competition_score(cross_fitted_counts(oof, fold_of, thresholds, areas, presence))
    assert honest <= tuned_on_all + 1e-12
    # a fold whose own frames would be emptied by the others' choice is scored with that choice
    oof.presence[[i for i, k in enumerate(oof.ids) if fold_of[k] == 0 and i % 2]] = 0.3
    damaged = metrics.competition_score(cross_fitted_counts(oof, fold_of, thresholds, areas, presence))
    assert damaged < honest


def test_kaggle_preset_trains_five_folds_of_disjoint_subjects_tuned_out_of_fold(kaggle_run):
    run = open_run(kaggle_run)
    assert [fold.path.name for fold in run.folds] == [f"fold_{k}" for k in range(5)]
    assert all(fold.best.is_file() and fold.done for fold in run.folds)
    split = splits.load_split(kaggle_run / runs.SPLIT_FILE)
    subjects = json.loads((kaggle_run / runs.SPLIT_FILE).read_text())["info"]["subjects"]
    fold_subjects = [{subjects[i] for i in fold} for fold in split.folds]
    assert all(a.isdisjoint(b) for k, a in enumerate(fold_subjects) for b in fold_subjects[k + 1 :])
    tuned = json.loads((kaggle_run / "postprocess.json").read_text())
    assert tuned["out_of_fold"] and tuned["frames"] == 38


def test_tune_reports_the_cross_fitted_score_that_the_accuracy_bench_computes(kaggle_run):
    run = open_run(kaggle_run)
    tuned = runs.Tuning.read(kaggle_run / runs.POSTPROCESS_FILE)
    thresholds, min_areas, presence = np.array(tuned.thresholds), np.array(tuned.min_areas), np.array(tuned.presence_thresholds)
    oof = oof_predictions(run, thresholds, tuned.tta, on_message=lambda line: None)
    split = splits.load_split(kaggle_run / runs.SPLIT_FILE)
    fold_of = {sample_id: fold for fold, members in enumerate(split.folds) for sample_id in members}
    honest = metrics.dice_per_image(cross_fitted_counts(oof, fold_of, thresholds, min_areas, presence)).mean()
    assert tuned.cross_fitted == pytest.approx(honest)


def test_kaggle_preset_predicts_every_training_frame_out_of_fold_exactly_once(kaggle_run):
    run = open_run(kaggle_run)
    oof = oof_predictions(run, np.array([0.5]), "none", on_message=lambda line: None)
    train_ids = sorted(path.stem for path in (sample_data_path() / "train").glob("*.tif") if not path.stem.endswith("_mask"))
    assert sorted(oof.ids) == train_ids and len(set(oof.ids)) == len(oof.ids)
    assert np.isfinite(oof.presence).all()


def test_kaggle_preset_then_predict_is_a_five_model_ensemble_submission(kaggle_run, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    test = sample_data_path() / "test"
    assert main(["predict", str(kaggle_run), str(test), "--out", str(out), "--allow-degenerate"]) == 0
    assert "with 5 fold model(s)" in capsys.readouterr().err
    rows = read_rows(out)
    assert rows[0] == ["img", "pixels"] and len(rows) == 1 + len(list(test.glob("*.tif")))


def test_onnx_export_of_a_presence_ensemble_matches_torch(kaggle_run, tmp_path):
    model = tmp_path / "model.onnx"
    assert main(["export", str(kaggle_run), "--onnx", str(model)]) == 0
    settings = json.loads(model.with_suffix(".json").read_text())
    assert settings["presence"]["name"] == "presence" and "presence_threshold" in settings["postprocess"]
    run = open_run(kaggle_run)
    frames = [np.random.default_rng(k).integers(0, 255, (420, 580), dtype=np.uint8) for k in range(3)]
    torch_models = [load_fold_model(run, fold, torch.device("cpu")) for fold in run.folds]
    for a, b in zip(predict_frames(torch_models, frames, run.config), predict_frames(OnnxEnsemble(model), frames, run.config)):
        assert np.abs(a.probs - b.probs).max() < 1e-3 and np.abs(a.presence - b.presence).max() < 1e-3


def test_a_run_saved_before_the_presence_head_existed_is_read_without_one(presence_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(presence_run, run)
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("\n".join(line for line in saved.splitlines() if "presence" not in line) + "\n")
    assert open_run(run).config.model.presence_head is False


def test_a_presence_head_without_its_loss_is_refused(tmp_path, capsys):
    args = ["train", str(sample_data_path()), "--out", str(tmp_path / "run"), "--preset", "cpu", "--quiet", "--no-report"]
    assert main(args + set_args(*TINY_OVERRIDES, "loss.presence_weight=0")) == 2
    assert "loss.presence_weight" in capsys.readouterr().err
