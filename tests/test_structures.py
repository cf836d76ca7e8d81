"""Several structures per frame, in every layout they come in: class-index masks with ``--classes``, one
mask folder per class, and long RLE tables (medseg's, UW-Madison's and Severstal's), read and inspected.

The frames and masks are real: a few usgra-seg frames, whose class-index masks hold the nerve (1) and the
vessel (2); the other layouts are written from those masks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, set_args
from medseg import runs
from medseg.cli import main
from medseg.config import DataOptions, LossConfig, load_config, parse_classes
from medseg.data import io, rle
from medseg.data.datasets import load_dataset, read_sample, sample_data_path, structure_masks
from medseg.data.long_rle import LONG_FORMATS, detect_format, read_long_table, write_long_table
from medseg.data.samples import load_samples
from medseg.errors import UsageError
from medseg.infer import submission as checker
from medseg.infer.export import ExportRequest, OnnxEnsemble, export_onnx
from medseg.infer.outputs import class_index_mask
from medseg.infer.predict import load_fold_model, predict_frames
from medseg.learn.fit import fit_fold
from medseg.learn.losses import create_loss
from medseg.learn.models import create_model, split_outputs

FRAMES = ("0000", "0001", "0002", "0003", "0012", "0025")  # 0012 and 0025 have no vessel
CLASSES = {"nerve": 1, "vessel": 2}


def make_class_index(root: Path, shared_data: Path) -> Path:
    """A folders-layout copy of six usgra-seg frames with their class-index masks."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for name in FRAMES:
        for folder in ("images", "masks"):
            shutil.copyfile(shared_data / "usgra-seg" / folder / f"{name}.png", root / folder / f"{name}.png")
    return root


@pytest.fixture
def class_index(tmp_path, shared_data) -> Path:
    return make_class_index(tmp_path / "class-index", shared_data)


@pytest.fixture(scope="module")
def two_structure_run(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """A tiny two-structure run (nerve, vessel) trained on two folds through the command line, and its data."""
    data = make_class_index(tmp_path_factory.mktemp("two") / "class-index", shared_data)
    run = data.parent / "run"
    args = ["train", str(data), "--classes", "nerve=1,vessel=2", "--out", str(run), "--preset", "cpu", "--folds", "2", "--quiet"]
    assert main([*args, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=2")]) == 0
    return run, data


def truth(class_index: Path, name: str) -> np.ndarray:
    """The (nerve, vessel) masks of a frame, straight from its class-index PNG."""
    values = io.read_mask_values(class_index / "masks" / f"{name}.png")
    return np.stack([values == 1, values == 2])


def per_class_folders(class_index: Path, target: Path) -> Path:
    """The same frames with one binary mask folder per class: masks/nerve/, masks/vessel/."""
    (target / "images").mkdir(parents=True)
    for name in FRAMES:
        shutil.copyfile(class_index / "images" / f"{name}.png", target / "images" / f"{name}.png")
        for channel, label in enumerate(CLASSES):
            (target / "masks" / label).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target / "masks" / label / f"{name}.png"), truth(class_index, name)[channel].astype(np.uint8) * 255)
    return target


def long_table(class_index: Path, target: Path, header=("id", "class", "rle"), order="F", suffix="", skip_empty=False) -> Path:
    """The same frames with one RLE row per frame and class."""
    (target / "images").mkdir(parents=True)
    rows = []
    for name in FRAMES:
        shutil.copyfile(class_index / "images" / f"{name}.png", target / "images" / f"{name}.png")
        for label, mask in zip(CLASSES, truth(class_index, name), strict=True):
            if not (skip_empty and not mask.any()):
                rows.append((f"{name}{suffix}", label, rle.encode(mask, order=order)))
    write_long_table(target / "train.csv", rows, header)
    return target


def test_class_names_and_labels_from_the_command_line():
    assert parse_classes("nerve=1,vessel=2") == {"nerve": 1, "vessel": 2}
    assert parse_classes("large_bowel, small_bowel,stomach") == {
        "large_bowel": "large_bowel",
        "small_bowel": "small_bowel",
        "stomach": "stomach",
    }
    assert DataOptions(classes="a=x,b=3").classes == {"a": "x", "b": 3}
    for bad, message in (("nerve=", "not NAME or NAME=LABEL"), ("a=1,a=2", "named twice"), (",", "not NAME")):
        with pytest.raises(ValueError, match=message):
            parse_classes(bad)


def test_class_index_masks_give_one_channel_per_named_class(class_index):
    dataset = load_dataset(class_index, DataOptions(classes=CLASSES))
    assert dataset.classes == ("nerve", "vessel") and not dataset.problems
    for record in dataset.train:
        image, masks = read_sample(record, dataset.options)
        assert masks.shape == (2, *image.shape) and masks.dtype == bool
        np.testing.assert_array_equal(masks, truth(class_index, record.id))


def test_one_mask_folder_per_class_is_detected(class_index, tmp_path):
    root = per_class_folders(class_index, tmp_path / "per-class")
    dataset = load_dataset(root)
    assert dataset.layout == "folders" and dataset.classes == ("nerve", "vessel") and not dataset.problems
    for record in dataset.train:
        np.testing.assert_array_equal(structure_masks(record, dataset.options), truth(class_index, record.id))
    chosen = load_dataset(root, DataOptions(classes={"vessels": "vessel"}))
    assert chosen.classes == ("vessels",)
    np.testing.assert_array_equal(structure_masks(chosen.train[0], chosen.options)[0], truth(class_index, FRAMES[0])[1])
    with pytest.raises(UsageError, match=r"no class 'artery' \(--classes artery=artery\); the data has nerve, vessel"):
        load_dataset(root, DataOptions(classes="artery"))


def test_a_frame_missing_one_class_mask_is_a_listed_problem(class_index, tmp_path):
    root = per_class_folders(class_index, tmp_path / "per-class")
    (root / "masks" / "vessel" / "0003.png").unlink()
    dataset = load_dataset(root)
    assert [(p.kind, p.path.name) for p in dataset.problems] == [("missing_mask", "0003.png")]
    assert "masks/vessel/0003.*" in dataset.problems[0].message


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("dialect", LONG_FORMATS, ids=lambda dialect: dialect.name)
def test_a_long_table_round_trips_in_every_dialect_and_order(class_index, tmp_path, dialect, order):
    header = (dialect.id_column, dialect.class_column, dialect.rle_column)
    root = long_table(class_index, tmp_path / "long", header, order, suffix=".png" if dialect.name == "severstal" else "")
    dataset = load_dataset(root, DataOptions(rle_order=order))
    assert dataset.layout == "rle-csv" and dataset.classes == ("nerve", "vessel") and not dataset.problems
    rows = []
    for record in dataset.train:
        masks = structure_masks(record, dataset.options)
        np.testing.assert_array_equal(masks, truth(class_index, record.id))
        rows += [(record.id, name, rle.encode(mask, order=order)) for name, mask in zip(dataset.classes, masks, strict=True)]
    write_long_table(tmp_path / "again.csv", rows, header)
    again = read_long_table(tmp_path / "again.csv", detect_format(list(header)))
    original = read_long_table(root / "train.csv", detect_format(list(header)))
    assert again.rows == original.rows and again.labels == ["nerve", "vessel"]


def test_a_missing_row_is_empty_only_where_the_dialect_says_so(class_index, tmp_path):
    severstal = long_table(class_index, tmp_path / "severstal", ("ImageId", "ClassId", "EncodedPixels"), skip_empty=True)
    dataset = load_dataset(severstal)
    assert not dataset.problems
    empty_vessel = [record.id for record in dataset.train if not truth(class_index, record.id)[1].any()]
    assert empty_vessel == ["0012", "0025"]  # frames whose vessel row the table leaves out
    for record in dataset.train:
        np.testing.assert_array_equal(structure_masks(record, dataset.options), truth(class_index, record.id))
    medseg_dialect = long_table(class_index, tmp_path / "medseg", skip_empty=True)
    problems = load_dataset(medseg_dialect).problems
    assert [p.kind for p in problems] == ["missing_mask"] * len(empty_vessel)
    assert all("class vessel" in p.message and "an empty RLE is an empty mask" in p.message for p in problems)


def test_a_pair_listed_twice_is_a_listed_problem(class_index, tmp_path):
    root = long_table(class_index, tmp_path / "long")
    text = (root / "train.csv").read_text()
    (root / "train.csv").write_text(text + text.splitlines()[1] + "\n")
    problems = load_dataset(root).problems
    assert [p.kind for p in problems] == ["duplicate_id"] and problems[0].message.startswith(
        "row 14: id 0000, class nerve already on row 2;"
    )


def test_inspect_reports_each_class_and_their_overlaps(class_index, tmp_path, capsys):
    root = per_class_folders(class_index, tmp_path / "per-class")
    overlapping = truth(class_index, "0002")
    vessel = (overlapping[0] | overlapping[1]).astype(np.uint8) * 255  # the vessel mask also covers the nerve
    cv2.imwrite(str(root / "masks" / "vessel" / "0002.png"), vessel)
    assert main(["inspect", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    masks = {name: truth(class_index, name) for name in FRAMES}
    for channel, label in enumerate(CLASSES):
        with_it = sum(bool(masks[name][channel].any()) for name in FRAMES)
        assert summary["classes"][label]["with"] == with_it and summary["classes"][label]["without"] == len(FRAMES) - with_it
    nerve_areas = sorted(int(masks[name][0].sum()) for name in FRAMES if masks[name][0].any())
    assert summary["classes"]["nerve"]["mask_area"]["min"] == nerve_areas[0]
    assert summary["overlapping_frames"] == {"nerve & vessel": 1}


def test_contradicting_near_duplicates_are_found_per_class(class_index, tmp_path, capsys):
    root = per_class_folders(class_index, tmp_path / "per-class")
    shutil.copyfile(root / "images" / "0001.png", root / "images" / "0001b.png")
    shutil.copyfile(root / "masks" / "nerve" / "0001.png", root / "masks" / "nerve" / "0001b.png")
    vessel = truth(class_index, "0001")[1]
    cv2.imwrite(str(root / "masks" / "vessel" / "0001b.png"), np.zeros(vessel.shape, np.uint8))
    assert main(["inspect", str(root), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    contradictions = [p for p in problems if p["kind"] == "contradicting_duplicates"]
    assert len(contradictions) == 1 and "class vessel: " in contradictions[0]["message"], problems
    assert vessel.any()


def test_two_structures_train_tune_and_predict_a_long_submission_in_the_samples_order(two_structure_run, tmp_path, capsys):
    trained, class_index = two_structure_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    plan = runs.RunPlan.read(run / runs.RUN_FILE)
    assert plan.classes == ["nerve", "vessel"] and plan.class_labels == {"nerve": "nerve", "vessel": "vessel"}
    assert runs.read_run_config(run / runs.CONFIG_FILE).model.structures == 2
    assert main(["tune", str(run), "--quiet", "--no-report"]) == 0
    tuning = runs.StructuresTuning.read(run / runs.POSTPROCESS_FILE)
    assert list(tuning.classes) == ["nerve", "vessel"] and tuning.frames == len(FRAMES)
    assert tuning.score_after == pytest.approx(np.mean([block.score_after for block in tuning.classes.values()]))
    assert tuning.cross_fitted == pytest.approx(np.mean([block.cross_fitted for block in tuning.classes.values()]))
    test = tmp_path / "test"
    test.mkdir()
    for name in FRAMES[:3]:
        shutil.copyfile(class_index / "images" / f"{name}.png", test / f"{name}.png")
    pairs = [(name, label) for label in ("vessel", "nerve") for name in reversed(FRAMES[:3])]  # an order of its own
    write_long_table(tmp_path / "sample.csv", [(name, label, "") for name, label in pairs], ("ImageId", "ClassId", "EncodedPixels"))
    out = tmp_path / "submission.csv"
    command = [
        "predict",
        str(run),
        str(test),
        "--out",
        str(out),
        "--sample",
        str(tmp_path / "sample.csv"),
        "--masks-dir",
        str(tmp_path / "masks"),
    ]
    assert main([*command, "--allow-degenerate", "--quiet"]) == 0
    written = read_long_table(out, detect_format(["ImageId", "ClassId", "EncodedPixels"]))
    assert list(written.row_numbers) == pairs  # every (id, class) once, in the sample's order
    report = checker.validate_file(out, sample=tmp_path / "sample.csv")
    assert not report.problems and report.rows == 6
    assert plan.class_values == CLASSES  # learnt from class-index masks: the structures exclude each other
    for name in FRAMES[:3]:  # so --masks-dir writes class-index PNGs, which agree with the submission
        values = io.read_mask_values(tmp_path / "masks" / f"{name}.png")
        assert set(np.unique(values)) <= {0, 1, 2}
        for label, value in CLASSES.items():
            assert not np.any((values == value) & ~rle.decode(written.rows[name][label], values.shape))
    assert main(["evaluate", str(run), str(class_index), "--out", str(tmp_path / "evaluation"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert summary["n_images"] == 2 * len(FRAMES) and set(summary["classes"]) == {"nerve", "vessel"}
    assert summary["score"] == pytest.approx(tuning.score_after)  # the same out-of-fold pairs and settings as tune's
    for name in ("nerve", "vessel"):
        assert summary["classes"][name]["score"] == pytest.approx(tuning.classes[name].score_after)
    per_pair = (tmp_path / "evaluation" / "per_image.csv").read_text().splitlines()
    assert per_pair[0].startswith("id,class,fold,") and len(per_pair) == 1 + 2 * len(FRAMES)
    assert main(["report", str(run), "--quiet"]) == 0
    page = (run / "report.html").read_text()
    assert "<h3>nerve</h3>" in page and "<h3>vessel</h3>" in page and "true outline solid, predicted outline dashed" in page
    figures = {path.name for path in (run / "report").iterdir()}
    assert {"tuning_nerve.png", "tuning_vessel.png"} <= figures and any(name.startswith("gallery_worst_") for name in figures)


def test_masks_of_structures_that_may_overlap_go_to_a_folder_each(two_structure_run, tmp_path):
    trained, class_index = two_structure_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    plan = runs.RunPlan.read(run / runs.RUN_FILE)
    plan.model_copy(update={"class_values": {}}).write(run / runs.RUN_FILE)  # as a run trained on masks/<class>/
    assert main(["predict", str(run), str(class_index / "images"), "--masks-dir", str(tmp_path / "masks"), "--quiet"]) == 0
    for label in CLASSES:
        written = sorted(path.stem for path in (tmp_path / "masks" / label).iterdir())
        assert written == sorted(FRAMES)
        assert set(np.unique(io.read_mask_values(tmp_path / "masks" / label / "0000.png"))) <= {0, 255}


def test_a_class_index_mask_gives_an_overlapped_pixel_to_the_likelier_structure():
    masks = np.array([[[1, 1, 0, 0]], [[0, 1, 1, 0]]], dtype=bool)
    probs = np.array([[[0.9, 0.6, 0.1, 0.0]], [[0.2, 0.7, 0.8, 0.1]]], dtype=np.float32)
    assert class_index_mask(masks, probs, [1, 2]).tolist() == [[1, 2, 2, 0]]
    assert class_index_mask(masks, probs, [3, 300]).dtype == np.uint16


def test_onnx_export_of_two_structures_matches_torch_per_structure(two_structure_run, tmp_path):
    run_path, class_index = two_structure_run
    model, settings = export_onnx(ExportRequest(run_path, tmp_path / "model.onnx"))
    meta = json.loads(settings.read_text())
    assert meta["classes"] == ["nerve", "vessel"] and set(meta["postprocess"]["classes"]) == {"nerve", "vessel"}
    run = runs.open_run(run_path)
    frames = [io.read_image(class_index / "images" / f"{name}.png") for name in FRAMES[:3]]
    torch_models = [load_fold_model(run, fold, torch.device("cpu")) for fold in run.folds]
    for ours, theirs in zip(
        predict_frames(torch_models, frames, run.config), predict_frames(OnnxEnsemble(model), frames, run.config), strict=True
    ):
        assert ours.probs.shape == theirs.probs.shape == (2, *frames[0].shape)
        np.testing.assert_allclose(ours.probs, theirs.probs, atol=1e-3)
        np.testing.assert_allclose(ours.presence, theirs.presence, atol=1e-3)


def test_the_kaggle_layout_refuses_classes(shared_data):
    with pytest.raises(UsageError, match="the kaggle layout has one structure per frame"):
        load_dataset(shared_data / "uns-mini", DataOptions(classes=CLASSES))


def test_one_structure_data_reads_as_before(class_index):
    dataset = load_dataset(class_index, DataOptions(mask_value=1))
    assert dataset.classes == ()
    image, mask = read_sample(dataset.train[0], dataset.options)
    assert mask.shape == image.shape
    np.testing.assert_array_equal(mask, truth(class_index, dataset.train[0].id)[0])


def test_a_named_class_column_that_is_not_there_is_one_line(class_index, tmp_path, capsys):
    root = long_table(class_index, tmp_path / "long")
    code = main(["inspect", str(root), "--class-column", "organ"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == f"error: {root / 'train.csv'}: no class column 'organ' (found: id, class, rle); check --class-column", err


def test_a_two_structure_model_trains_with_one_channel_per_structure(class_index, tmp_path):
    """The training engine for several structures (the command line takes them in a later step)."""
    dataset = load_dataset(class_index, DataOptions(classes=CLASSES))
    samples = load_samples(dataset.train, dataset.options)
    assert samples["0000"][1].shape == (2, *samples["0000"][0].shape)
    overrides = [*TINY_OVERRIDES, "trainer.max_epochs=2", "model.structures=2", "loss.class_weights=[1, 2]"]
    config = load_config("cpu", overrides=overrides)
    fold = runs.FoldDir(0, tmp_path / "fold")
    ids = [record.id for record in dataset.train]
    result, _ = fit_fold(config, fold, samples, ids[:4], ids[4:])
    assert result.epochs == 2 and math.isfinite(result.best_val_loss) and 0.0 <= result.best_val_score <= 1.0
    model, _ = create_model(config.model.model_copy(update={"encoder_weights": "none"}))
    state = runs.read_checkpoint(fold.best, "retrain")["state_dict"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")})
    logits, presence = split_outputs(model.eval()(torch.zeros(2, 1, 64, 96)))
    assert logits.shape == (2, 2, 64, 96) and presence.shape == (2, 2)


def test_the_loss_of_two_structures_is_the_weighted_mean_of_their_losses():
    torch.manual_seed(0)
    logits, presence = torch.randn(3, 2, 16, 16), torch.randn(3, 2)
    target = (torch.rand(3, 2, 16, 16) > 0.7).float()
    target[0, 1] = 0
    weights = [1.0, 3.0]
    joint = create_loss(LossConfig(class_weights=weights))((logits, presence), target)
    single = create_loss(LossConfig())
    alone = [single((logits[:, c : c + 1], presence[:, c : c + 1]), target[:, c : c + 1]) for c in range(2)]
    torch.testing.assert_close(joint, (alone[0] * 1 + alone[1] * 3) / 4)
    with pytest.raises(ValueError, match="3 weights for 2 structures"):
        create_loss(LossConfig(class_weights=[1, 1, 1]))((logits, presence), target)


def long_submission(tmp_path: Path, class_index: Path, drop: tuple[str, str] | None = None, full: str | None = None) -> tuple[Path, Path]:
    """A long sample submission of the six frames and a submission of their true masks (one row per id and class)."""
    header = ("id", "class", "rle")
    pairs = [(name, label) for name in FRAMES for label in CLASSES]
    write_long_table(tmp_path / "sample.csv", [(name, label, "") for name, label in pairs], header)
    rows = []
    for name, label in pairs:
        mask = truth(class_index, name)[list(CLASSES).index(label)]
        if label == full:
            mask = np.ones_like(mask)
        if (name, label) != drop:
            rows.append((name, label, rle.encode(mask)))
    write_long_table(tmp_path / "submission.csv", rows, header)
    return tmp_path / "submission.csv", tmp_path / "sample.csv"


def test_a_long_submission_with_every_pair_passes_the_checker(class_index, tmp_path, capsys):
    submission, sample = long_submission(tmp_path, class_index)
    shape = [str(v) for v in io.read_mask_values(class_index / "masks" / "0000.png").shape]
    code = main(["check-submission", str(submission), "--sample", str(sample), "--shape", *shape])
    out = capsys.readouterr().out
    assert code == 0 and "valid" in out and "12 rows" in out and "2 empty masks" in out, out


def test_the_checker_refuses_a_long_submission_missing_one_pair(class_index, tmp_path, capsys):
    submission, sample = long_submission(tmp_path, class_index, drop=("0003", "vessel"))
    code = main(["check-submission", str(submission), "--sample", str(sample)])
    err = capsys.readouterr().err
    assert code == 1 and "class 'vessel': 1 sample id(s) missing ('0003')" in err and len(err.strip().splitlines()) == 1, err


def test_the_checker_refuses_an_all_full_class(class_index, tmp_path, capsys):
    submission, sample = long_submission(tmp_path, class_index, full="vessel")
    frames = {name: io.read_mask_values(class_index / "masks" / f"{name}.png").shape for name in FRAMES}
    report = checker.validate_file(submission, sample=sample, sizes=frames)
    assert report.degenerate[0] == "class 'vessel': every mask is full or nearly full (6 of 6 cover >= 90% of their frame)"
    assert all(finding.startswith("class 'vessel': ") for finding in report.degenerate) and not report.problems


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.structures=2", "model.structures=2 but the data has 1 structure(s)"),
        ("loss.class_weights=[1, 2]", "2 weight(s) for 1 structure(s)"),
    ],
)
def test_structure_settings_that_do_not_fit_the_data_are_one_line(tmp_path, capsys, override, message):
    code = main(["train", str(sample_data_path()), "--out", str(tmp_path / "run"), "--preset", "cpu", "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_class_index_label_that_is_not_a_mask_value_is_one_line(class_index, capsys):
    code = main(["inspect", str(class_index), "--classes", "nerve=1,vessel=x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "class-index masks name each class by its mask value, not 'x'; write e.g. --classes vessel=2" in err
