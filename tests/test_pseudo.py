"""Learning from frames without labels: a teacher run's sure masks join the student's training folds, never a validation
fold, each fold learning only from a teacher model that did not train on its validation frames.

The teacher is the shared 2-fold tiny run on 12 uns-mini frames (``two_fold_run``); the frames without labels are
uns-mini test frames.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_OVERRIDES, TWO_FOLD_IDS, set_args
from medseg.cli import main
from medseg.config import load_config
from medseg.infer.predict import PostProcess, Prediction
from medseg.infer.pseudo import ConfidenceRule, PseudoRequest, pseudo_label
from medseg.learn import train as train_module
from medseg.learn.pseudo import ENSEMBLE, PREFIX, read_examples
from medseg.learn.train import TrainRequest, train_run
from medseg.splits import load_split

EVERY_MASK = ConfidenceRule(presence_margin=0.0, border=0.0, unsure_share=1.0)  # every mask counts as sure
TEST_FRAMES = ("1", "2", "3", "5", "8", "13")
OTHER_SUBJECTS = tuple(f"{subject}_{index}" for subject in ("7", "8", "9", "10", "11", "12") for index in (1, 2))


@pytest.fixture(scope="module")
def unlabeled(shared_data, tmp_path_factory) -> Path:
    """Six uns-mini test frames (no labels)."""
    folder = tmp_path_factory.mktemp("unlabeled") / "frames"
    folder.mkdir()
    for name in TEST_FRAMES:
        shutil.copyfile(shared_data / "uns-mini" / "test" / f"{name}.tif", folder / f"{name}.tif")
    return folder


def student_config(*overrides: str):
    return load_config("cpu", overrides=[*TINY_OVERRIDES, "trainer.max_epochs=1", *overrides])


def kaggle_copy(shared_data: Path, root: Path, ids: tuple[str, ...]) -> Path:
    """A Kaggle-layout data folder of some uns-mini training frames and their mask files."""
    (root / "train").mkdir(parents=True)
    for sample_id in ids:
        for suffix in ("", "_mask"):
            shutil.copyfile(shared_data / "uns-mini" / "train" / f"{sample_id}{suffix}.tif", root / "train" / f"{sample_id}{suffix}.tif")
    return root


@pytest.fixture
def fits(monkeypatch) -> list[dict]:
    """Every fold trained, as ``fit_fold`` was called: its fold, training and validation ids, and its frames."""
    calls = []
    real = train_module.fit_fold

    def spy(config, fold_dir, samples, train_ids, val_ids, *rest):
        calls.append({"fold": fold_dir.fold, "train": list(train_ids), "val": list(val_ids), "samples": samples})
        return real(config, fold_dir, samples, train_ids, val_ids, *rest)

    monkeypatch.setattr(train_module, "fit_fold", spy)
    return calls


def test_each_fold_learns_from_the_teacher_model_that_left_its_validation_out(two_fold_run, unlabeled, tmp_path, fits):
    data = two_fold_run.parent / "data"
    config = student_config()
    labels, record = pseudo_label(PseudoRequest(two_fold_run, unlabeled, EVERY_MASK), config, on_message=lambda _: None)
    assert labels.ids == list(TEST_FRAMES) and set(labels.masks) == {0, 1, ENSEMBLE}
    assert all(labels.kept(source) == len(TEST_FRAMES) for source in labels.masks)
    run = tmp_path / "student"
    train_run(TrainRequest(data, run, config, folds=2, pseudo=labels, pseudo_record=record), on_message=lambda _: None)

    plan = json.loads((run / "run.json").read_text())["pseudo"]
    assert plan["sources"] == {"0": 0, "1": 1}, "the teacher trained on these frames: each fold takes its own fold's model"
    assert plan["kept"] == {"0": 6, "1": 6} and plan["ids"] == list(TEST_FRAMES) and plan["teacher_run_id"] == record["teacher_run_id"]
    split = load_split(run / "split.json")
    assert sorted(split.ids) == sorted(TWO_FOLD_IDS), "a pseudo-labelled frame is in no fold of the split"
    for call in fits:
        pseudo = [sample_id for sample_id in call["train"] if sample_id.startswith(PREFIX)]
        assert pseudo == [f"{PREFIX}{name}" for name in TEST_FRAMES]
        assert not any(sample_id.startswith(PREFIX) for sample_id in call["val"]), "a pseudo-labelled frame was validated on"
        for name in TEST_FRAMES:
            mask = labels.masks[call["fold"]][TEST_FRAMES.index(name)]
            assert np.array_equal(call["samples"][f"{PREFIX}{name}"][1], mask.view(np.uint8))


def test_a_teacher_that_never_saw_the_labelled_frames_lends_its_ensemble(two_fold_run, unlabeled, shared_data, tmp_path, fits):
    data = kaggle_copy(shared_data, tmp_path / "other", OTHER_SUBJECTS)
    config = student_config()
    labels, record = pseudo_label(PseudoRequest(two_fold_run, unlabeled, EVERY_MASK), config, on_message=lambda _: None)
    train_run(TrainRequest(data, tmp_path / "student", config, folds=2, pseudo=labels, pseudo_record=record), on_message=lambda _: None)
    plan = json.loads((tmp_path / "student" / "run.json").read_text())["pseudo"]
    assert plan["sources"] == {"0": ENSEMBLE, "1": ENSEMBLE}


def test_a_fold_whose_validation_every_teacher_model_trained_on_is_refused(two_fold_run, unlabeled, tmp_path, capsys):
    data = two_fold_run.parent / "data"
    args = ["train", str(data), "--out", str(tmp_path / "student"), "--preset", "cpu", "--folds", "3", "--quiet", "--no-report"]
    code = main([*args, "--unlabeled", str(unlabeled), "--teacher", str(two_fold_run), *set_args(*TINY_OVERRIDES)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "every model of the teacher trained on some of this fold's validation frames" in err
    assert not (tmp_path / "student").exists(), "nothing is written before the pseudo-labels are known to be honest"


def test_the_command_line_records_them_and_resume_labels_them_again(two_fold_run, unlabeled, tmp_path, capsys):
    data, run = two_fold_run.parent / "data", tmp_path / "student"
    args = ["train", str(data), "--out", str(run), "--preset", "cpu", "--folds", "2", "--no-report"]
    assert (
        main([*args, "--unlabeled", str(unlabeled), "--teacher", str(two_fold_run), *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1")])
        == 0
    )
    err = capsys.readouterr().err
    assert "sure enough to train on" in err and "pseudo-labelled frames from the teacher's fold 0 model" in err
    pseudo = json.loads((run / "run.json").read_text())["pseudo"]
    assert pseudo["frames"] == str(unlabeled.resolve()) and pseudo["rule"] == {"presence_margin": 0.6, "border": 0.1, "unsure_share": 0.2}
    assert main(["report", str(run), "--quiet"]) == 0
    page = (run / "report.html").read_text()
    assert 'id="pseudo"' in page and str(two_fold_run) in page and "each fold learnt from a teacher model" in page
    examples = len(read_examples(run / "pseudo_examples.npz"))
    assert (
        examples == min(8, pseudo["kept"]["0"])
        and page.count(html.escape("the teacher's pseudo-label")) + page.count("sure to be empty") == examples
    )
    assert main(["predict", str(run), str(unlabeled), "--out", str(tmp_path / "s.csv"), "--allow-degenerate"]) == 0
    assert "6 of these 6 frames were pseudo-labelled by" in " ".join(capsys.readouterr().err.split())
    assert main(["train", str(data), "--out", str(run), "--resume", "--no-report"]) == 0
    assert "pseudo-labelling 6 frames" in capsys.readouterr().err
    next_round = ["train", str(data), "--out", str(tmp_path / "round3"), "--preset", "cpu", "--folds", "2", "--quiet", "--no-report"]
    assert (
        main([*next_round, "--unlabeled", str(unlabeled), "--teacher", str(run), *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1")]) == 0
    )
    assert json.loads((tmp_path / "round3" / "run.json").read_text())["pseudo"]["sources"] == {"0": 0, "1": 1}
    changed = tmp_path / "changed"
    shutil.copytree(unlabeled, changed)
    pseudo["frames"] = str(changed)
    plan = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**plan, "pseudo": pseudo}))
    shutil.copyfile(unlabeled / "2.tif", changed / "1.tif")
    assert main(["train", str(data), "--out", str(run), "--resume", "--no-report", "--quiet"]) == 2
    assert "changed since the run started; start it again with --force" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "code", "says"),
    [
        (lambda root, teacher, data: root, 2, "no images to predict"),
        (lambda root, teacher, data: root / "missing", 2, "missing: no such folder of frames"),
        (lambda root, teacher, data: (root / "x.tif").write_bytes(b"II*\x00broken") and root, 1, "x.tif: TIFF has no readable frame"),
        (lambda root, teacher, data: shutil.copyfile(data / "train" / "1_1.tif", root / "copy.tif") and root, 2, "are labelled frames"),
    ],
    ids=["empty folder", "missing folder", "unreadable frame", "a labelled frame"],
)
def test_bad_frames_are_one_line(two_fold_run, tmp_path, capsys, make, code, says):
    data = two_fold_run.parent / "data"
    frames = tmp_path / "frames"
    frames.mkdir()
    folder = make(frames, two_fold_run, data)
    args = ["train", str(data), "--out", str(tmp_path / "student"), "--preset", "cpu", "--folds", "2", "--quiet", "--no-report"]
    exit_code = main([*args, "--unlabeled", str(folder), "--teacher", str(two_fold_run), *set_args(*TINY_OVERRIDES)])
    err = capsys.readouterr().err.strip()
    assert exit_code == code and len(err.splitlines()) == 1 and says in err, err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            ["--unlabeled", "{frames}", "--teacher", "{teacher}", "--set", "input.height=128"],
            "the teacher's input is 96x64, the student's 96x128",
        ),
        (["--teacher", "{teacher}"], "--unlabeled FRAMES and --teacher RUN go together"),
        (["--unlabeled", "{frames}"], "--unlabeled FRAMES and --teacher RUN go together"),
        (["--resume", "--unlabeled", "{frames}", "--teacher", "{teacher}"], "drop --preset, --config, --set, --unlabeled"),
    ],
)
def test_teacher_and_option_mistakes_are_one_line(two_fold_run, unlabeled, tmp_path, capsys, extra, says):
    data = two_fold_run.parent / "data"
    filled = [argument.replace("{teacher}", str(two_fold_run)).replace("{frames}", str(unlabeled)) for argument in extra]
    code = main(["train", str(data), "--out", str(tmp_path / "student"), "--preset", "cpu", "--quiet", *set_args(*TINY_OVERRIDES), *filled])
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err, err


def prediction(probs: np.ndarray, presence: float) -> Prediction:
    return Prediction(probs[None].astype(np.float32), np.array([presence]))


def test_the_confidence_rule():
    rule, post = ConfidenceRule(), [PostProcess(threshold=0.5, presence_threshold=0.5)]
    sharp = np.zeros((10, 10))
    sharp[2:8, 2:8] = 0.95
    assert rule.sure_mask(prediction(sharp, 0.9), post)[0].sum() == 36  # present for sure, a sharp outline
    assert rule.sure_mask(prediction(sharp, 0.7), post) is None  # present, but the head is unsure (< 0.8)
    assert not rule.sure_mask(prediction(sharp, 0.1), post).any()  # the head is sure it is absent: an empty mask
    blurred = sharp.copy()
    blurred[2:8, 2:8] = 0.55  # every pixel of the mask within 0.1 of the threshold
    assert rule.sure_mask(prediction(blurred, 0.9), post) is None
    faint = np.full((10, 10), 0.45)  # nothing drawn, but everything nearly
    assert rule.sure_mask(prediction(faint, float("nan")), [PostProcess(threshold=0.5)]) is None
    assert not rule.sure_mask(prediction(np.full((10, 10), 0.05), float("nan")), [PostProcess(threshold=0.5)]).any()
