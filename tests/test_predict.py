"""Prediction, tuning, submissions, evaluation and the demo, end to end on the CPU."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import read_rows, write_rows
from medseg import demo
from medseg.cli import main
from medseg.config import load_config
from medseg.data import io, rle
from medseg.infer import submission
from medseg.infer.predict import PostProcess, load_fold_model, predict_frames, read_postprocess
from medseg.infer.tune import best_point, score_grid
from medseg.learn import metrics
from medseg.runs import open_run


def test_predict_writes_the_sample_order_and_the_checker_accepts_it(run_copy, tmp_path, shared_data, capsys):
    out = tmp_path / "s.csv"
    assert main(["predict", str(run_copy), str(shared_data / "uns-mini" / "test"), "--out", str(out), "--quiet", "--allow-degenerate"]) == 0
    rows = read_rows(out)
    sample = read_rows(shared_data / "uns-mini" / "sample_submission.csv")
    assert rows[0] == ["img", "pixels"] and len(rows) == 54
    assert [row[0] for row in rows[1:]] == [row[0] for row in sample[1:]]
    for _, pixels in rows[1:]:
        rle.check(pixels, (420, 580))
    capsys.readouterr()
    code = main(
        [
            "check-submission",
            str(out),
            "--sample",
            str(shared_data / "uns-mini" / "sample_submission.csv"),
            "--shape",
            "420",
            "580",
            "--allow-degenerate",
        ]
    )
    assert code == 0 and "valid" in capsys.readouterr().out


def test_predict_refuses_to_overwrite_and_writes_masks_and_probs(run_copy, tmp_path, shared_data, capsys):
    out = tmp_path / "s.csv"
    out.write_text("keep")
    args = ["predict", str(run_copy), str(shared_data / "uns-mini" / "test"), "--out", str(out), "--quiet", "--allow-degenerate"]
    assert main(args) == 2 and out.read_text() == "keep"
    capsys.readouterr()
    mistyped = ["predict", str(run_copy), str(tmp_path / "tset"), "--out", str(out), "--quiet"]
    assert main(mistyped) == 2 and "tset: not a folder of images" in capsys.readouterr().err  # the input first, not "exists"
    masks = tmp_path / "masks"
    assert main([*args, "--force", "--masks-dir", str(masks), "--save-probs", "--no-tta"]) == 0
    assert len(list(masks.glob("*.png"))) == 53
    with np.load(f"{out}.probs.npz") as probs:
        assert probs["p0"].dtype == np.float16 and probs["p0"].shape == (420, 580) and len(probs["ids"]) == 53


def test_tune_writes_postprocess_and_predict_uses_it(run_copy, capsys):
    assert main(["tune", str(run_copy), "--quiet", "--no-report"]) == 0
    tuned = json.loads((run_copy / "postprocess.json").read_text())
    assert main(["tune", str(run_copy), "--quiet", "--no-report"]) == 2  # tuned already: needs --force
    assert main(["tune", str(run_copy), "--quiet", "--no-report", "--force"]) == 0
    assert json.loads((run_copy / "postprocess.json").read_text())["threshold"] == tuned["threshold"]
    assert 0.05 <= tuned["threshold"] <= 0.95 and tuned["min_area"] >= 0
    assert tuned["score_after"] >= tuned["score_before"]
    assert len(tuned["scores"]) == len(tuned["thresholds"]) and len(tuned["scores"][0]) == len(tuned["min_areas"])
    run = open_run(run_copy)
    assert read_postprocess(run) == [PostProcess(tuned["threshold"], tuned["min_area"], tuned["presence_threshold"], tuned=True)]


def fabricated_problem():
    """Frames whose best post-processing is known: threshold 0.70, minimum area 200 px."""
    rng = np.random.default_rng(0)
    probs, truths = [], []
    for index in range(12):
        truth = np.zeros((60, 80), dtype=bool)
        prob = rng.uniform(0.0, 0.3, size=truth.shape)
        if index % 2 == 0:
            truth[10:40, 20:40] = True  # 600 px of nerve, predicted at 0.75
            prob[truth] = 0.75
            prob[5:10, 20:40] = 0.65  # a rim that thresholds <= 0.65 wrongly keep
        else:
            prob[50:60, 60:75] = 0.9  # a 150 px false blob on an empty frame: min area 200 removes it
        probs.append(prob)
        truths.append(truth)
    return probs, truths


def test_tuning_finds_a_known_optimum():
    thresholds = np.round(np.arange(0.05, 0.951, 0.05), 2)
    min_areas = np.array([0, 100, 200, 300, 500, 1000])
    probs, truths = fabricated_problem()
    counts = metrics.sweep_counts(probs, truths, thresholds)
    scores = score_grid(counts, min_areas)
    assert best_point(scores, thresholds, min_areas) == PostProcess(0.70, 200, 0.0, tuned=True)
    assert scores.max() == pytest.approx(1.0)
    assert scores[np.flatnonzero(thresholds == 0.5)[0], 0] < 1.0
    direct = np.mean(
        [
            metrics.dice_per_image(metrics.confusion_counts(PostProcess(0.7, 200).apply(p.copy())[None], t[None]))[0]
            for p, t in zip(probs, truths)
        ]
    )
    assert direct == pytest.approx(1.0)


class MirrorSymmetric(nn.Module):
    """A convolution with a left-right symmetric kernel: flipping its input flips its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 5, padding=2, bias=True)
        with torch.no_grad():
            weight = torch.randn(1, 1, 5, 5)
            self.conv.weight.copy_((weight + weight.flip(-1)) / 2)

    def forward(self, x):
        return self.conv(x)


def test_tta_on_a_flip_equivariant_model_equals_no_tta(shared_data):
    config = load_config("cpu", overrides=["input.height=64", "input.width=96"])
    frames = [io.read_image(shared_data / "uns-mini" / "test" / f"{n}.tif") for n in (1, 2, 3)]
    model = MirrorSymmetric().eval()
    plain = [prediction.probs for prediction in predict_frames([model], frames, config, tta="none")]
    flipped = [prediction.probs for prediction in predict_frames([model], frames, config, tta="hflip")]
    for a, b in zip(plain, flipped):
        assert a.shape == (1, 420, 580)
        np.testing.assert_allclose(a, b, atol=1e-6)


class ShiftedLogits(nn.Module):
    """Another model: a trained one whose pixel and presence logits are shifted by constants."""

    def __init__(self, model: nn.Module, pixel_shift: float, presence_shift: float):
        super().__init__()
        self.model, self.pixel_shift, self.presence_shift = model, pixel_shift, presence_shift

    def forward(self, x):
        logits, presence = self.model(x)
        return logits + self.pixel_shift, presence + self.presence_shift


def test_an_ensemble_averages_the_sigmoids_and_presences_of_its_models(run_copy, shared_data):
    run = open_run(run_copy)
    assert run.config.model.presence_head
    one = load_fold_model(run, run.folds[0], torch.device("cpu"))
    other = ShiftedLogits(one, 2.0, -1.5).eval()
    frames = [io.read_image(shared_data / "uns-mini" / "test" / f"{n}.tif") for n in (4, 5)]
    for tta in ("none", "hflip"):
        singles = [list(predict_frames([model], frames, run.config, tta=tta)) for model in (one, other)]
        ensemble = list(predict_frames([one, other], frames, run.config, tta=tta))
        mean_logits = list(predict_frames([ShiftedLogits(one, 1.0, -0.75).eval()], frames, run.config, tta=tta))
        for a, b, both, middle in zip(*singles, ensemble, mean_logits, strict=True):
            assert np.abs(a.probs - b.probs).max() > 0.1 and np.abs(a.presence - b.presence).min() > 1e-4  # two different models
            np.testing.assert_allclose(both.probs, (a.probs + b.probs) / 2, atol=1e-5)
            np.testing.assert_allclose(both.presence, (a.presence + b.presence) / 2, atol=1e-6)
            assert np.abs(both.probs - middle.probs).max() > 0.01  # the mean of the sigmoids, not the sigmoid of the mean logit
    for a, b in zip(predict_frames([one], frames, run.config), predict_frames([one, one], frames, run.config), strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)  # and a model averaged with itself is that model
        np.testing.assert_allclose(a.presence, b.presence, atol=1e-6)


def write_submission_rows(path: Path, rows):
    write_rows(path, [["img", "pixels"], *rows])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[str(n), "1 243600"] for n in range(1, 54)], "full"),
        ([[str(n), ""] for n in range(1, 53)], "missing"),
        ([[str(n), ""] for n in range(1, 54)] + [["7", ""]], "more than once"),
    ],
)
def test_check_submission_refuses_bad_submissions(tmp_path, shared_data, capsys, rows, message):
    path = tmp_path / "bad.csv"
    write_submission_rows(path, rows)
    code = main(
        ["check-submission", str(path), "--sample", str(shared_data / "uns-mini" / "sample_submission.csv"), "--shape", "420", "580"]
    )
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


def test_predict_refuses_degenerate_output_and_writes_nothing(run_copy, tmp_path, shared_data, capsys):
    (run_copy / "postprocess.json").write_text(json.dumps({"threshold": 0.0, "min_area": 0}))
    out = tmp_path / "s.csv"
    assert main(["predict", str(run_copy), str(shared_data / "uns-mini" / "test"), "--out", str(out), "--quiet"]) == 1
    assert "degenerate" in capsys.readouterr().err and not out.exists()


def test_evaluate_scores_held_out_frames_of_the_own_data_and_all_frames_of_other_data(run_copy, shared_data, capsys):
    assert main(["evaluate", str(run_copy), str(shared_data / "uns-mini"), "--quiet", "--no-tta"]) == 0
    own = run_copy / "evaluation" / "uns-mini"
    summary = json.loads((own / "summary.json").read_text())
    split = json.loads((run_copy / "split.json").read_text())
    assert summary["mode"].startswith("out-of-fold") and summary["n_images"] == len(split["folds"][0])
    with open(own / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"id", "fold", "truth_area", "pred_area", "dice", "iou", "truth_empty", "pred_empty"}
    assert np.mean([float(row["dice"]) for row in rows]) == pytest.approx(summary["score"], abs=1e-5)
    assert "competition score" in capsys.readouterr().out
    assert main(["evaluate", str(run_copy), str(shared_data / "uns-mini"), "--quiet"]) == 2  # exists: needs --force
    capsys.readouterr()
    mistyped = ["evaluate", str(run_copy), str(shared_data / "uns-mnii"), "--out", str(own), "--quiet"]
    assert main(mistyped) == 2 and "uns-mnii" in capsys.readouterr().err  # the mistyped data first, not "already there"


def test_demo_runs_the_whole_workflow(tmp_path, capsys, monkeypatch):
    """Every step and output of the demo; its 30 epochs are make demo's to run, two show the same files."""
    short = [value for value in demo.CPU_DEMO if not value.startswith("trainer.max_epochs=")]
    monkeypatch.setattr(demo, "CPU_DEMO", [*short, "trainer.max_epochs=2"])
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    report = submission.validate_file(tmp_path / "demo" / "submission.csv", sample=None, sizes=(420, 580))
    assert report.rows == 4 and not report.problems
    assert (tmp_path / "demo" / "run" / "postprocess.json").is_file()
    page = (tmp_path / "demo" / "run" / "report.html").read_text()
    for section in ("warnings", "headline", "data", "config", "training", "folds", "tuning", "evaluation", "gallery"):
        assert f'id="{section}"' in page
    assert len(list((tmp_path / "demo" / "run" / "report").glob("gallery_*.png"))) == 8  # every held-out frame of the sample
    assert "submission" in capsys.readouterr().out
