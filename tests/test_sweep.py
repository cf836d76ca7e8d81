"""``medseg sweep``: an Optuna study whose trials train and tune on subject-grouped folds, on eight real usgra-seg frames.

One nested sweep (two trials, outer fold 0 of 4 kept out) is shared by the tests of its outputs: ``best.yaml`` that
``medseg train --config`` accepts, ``trials.csv``, the outer fold's score from frames no trial saw and ``study.html``
in Chromium. Failed, pruned and interrupted trials, two processes on one SQLite study and the user's mistakes have
their own small studies; trials that fail on their configuration cost no training.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import TINY_OVERRIDES, set_args
from medseg.cli import main
from medseg.config import load_config
from medseg.errors import UsageError
from medseg.sweep import study as sweep_study
from medseg.sweep.space import DEFAULT_SPACE, load_space, parse_space
from medseg.sweep.study import SweepRequest, open_storage, run_sweep
from test_report_browser import CHROMIUM, CHROMIUM_ARGS, NETWORK, artefact_path, sync_playwright

FRAMES = ("0000", "0001", "0002", "0003", "0005", "0006", "0007", "0008")
SETS = (*TINY_OVERRIDES, "trainer.max_epochs=1")
SMALL_SPACE = "optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\naugment.hflip.p: {low: 0.0, high: 0.5}\n"
BAD_SPACE = "optim.schedule: {choices: [linear]}\n"  # a value the configuration refuses: every trial fails, untrained
REFUSED = "config key 'optim.schedule': Input should be 'plateau' or 'cosine'"
SCRIPT = shutil.which("medseg", path=str(Path(sys.executable).parent))


def make_tiny(root: Path, shared_data: Path) -> Path:
    """A folders-layout copy of eight usgra-seg frames (class-index masks: 1 is the nerve)."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
        for name in FRAMES:
            shutil.copyfile(shared_data / "usgra-seg" / folder / f"{name}.png", root / folder / f"{name}.png")
    return root


def write_space(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def sweep_args(data: Path, study: Path, space: Path, *extra: str, folds: str = "2") -> list[str]:
    """``medseg sweep`` on the tiny data: cpu preset at 64x96, 1 epoch, 2 folds."""
    args = ["sweep", str(data), "--out", str(study), "--preset", "cpu", "--folds", folds, "--mask-value", "1", "--space", str(space)]
    return [*args, *set_args(*SETS), *extra]


def run_main(args: list[str]) -> tuple[int, str, str]:
    """The command line in this process, with its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def read_trials(study: Path) -> list[dict[str, str]]:
    with open(study / "trials.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def load_study(study: Path) -> optuna.Study:
    return optuna.load_study(study_name="medseg", storage=f"sqlite:///{study / 'study.db'}")


def request(data: Path, study: Path, space: Path, **changes) -> SweepRequest:
    """The Python API's request of :func:`sweep_args`."""
    values = {"data.mask_value": 1}
    return SweepRequest(data, study, "cpu", overrides=list(SETS), values=values, space_file=space, folds=2, **changes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data) -> Path:
    return make_tiny(tmp_path_factory.mktemp("sweep") / "tiny", shared_data)


@pytest.fixture(scope="module")
def nested(tiny, tmp_path_factory) -> dict:
    """A two-trial sweep with outer fold 0 of 4 (two frames) kept out of both trials, through the command line."""
    root = tmp_path_factory.mktemp("nested")
    space = write_space(root / "space.yaml", SMALL_SPACE)
    study = root / "study"
    started = time.perf_counter()
    code, out, err = run_main(sweep_args(tiny, study, space, "--trials", "2", "--outer-fold", "0", "--outer-folds", "4", "--seed", "0"))
    assert code == 0, out + err
    return {"study": study, "out": out, "err": err, "minutes": (time.perf_counter() - started) / 60}


# --- the space ---------------------------------------------------------------------------------------------------


def test_the_default_space_names_keys_the_configuration_has():
    space = load_space(None)
    assert space.source == "default"
    assert {"optim.lr", "optim.weight_decay", "trainer.max_epochs", "loss.dice_weight", "model.encoder", "input"} <= {
        param.key for param in space.params
    }
    drawn = space.suggest(optuna.trial.FixedTrial(_first_values(space)))
    assert drawn["input.height"] == 128 and drawn["input.width"] == 160
    load_config("cpu", values=drawn)  # every key and value of the default space is one the configuration takes
    assert yaml.safe_load(DEFAULT_SPACE)["optim.lr"]["log"] is True


def _first_values(space) -> dict:
    return {param.key: param.choices[0] if param.kind == "choice" else param.low for param in space.params}


def test_ranges_are_floats_or_whole_numbers_and_text_numbers_count():
    space = parse_space(
        {"optim.lr": {"low": "1e-4", "high": 1.0e-2, "log": True}, "trainer.max_epochs": {"low": 5, "high": 20, "step": 5}}, "t"
    )
    lr, epochs = space.params
    assert (lr.kind, lr.low, lr.log) == ("float", 1e-4, True)
    assert (epochs.kind, epochs.step) == ("int", 5)
    values = space.suggest(optuna.trial.FixedTrial({"optim.lr": 1e-3, "trainer.max_epochs": 15}))
    assert values == {"optim.lr": 1e-3, "trainer.max_epochs": 15}


def test_a_configuration_is_given_back_as_the_values_that_draw_it():
    config = load_config("cpu", overrides=["optim.lr=1e-3", "trainer.max_epochs=25", "input.height=128", "input.width=160"])
    space = parse_space(
        {
            "optim.lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True},
            "trainer.max_epochs": {"low": 30, "high": 40},
            "model.encoder": {"choices": ["resnet18", "resnet34"]},
            "input": {"choices": [{"height": 128, "width": 128}, {"height": 128, "width": 160}]},
        },
        "t",
    )
    drawn = space.drawn_for(config)
    assert drawn == {"optim.lr": 1e-3, "model.encoder": "resnet18", "input": "height=128,width=160"}, "25 epochs is out of range"
    values = space.suggest(optuna.trial.FixedTrial({**drawn, "trainer.max_epochs": 35}))
    assert (values["input.width"], values["model.encoder"], values["optim.lr"]) == (160, "resnet18", 1e-3)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"optim.lrr": {"low": 0.1, "high": 1.0}}, ["unknown config key 'optim.lrr'", "optim.lr"]),
        ({"data.mask_value": {"choices": [1, 2]}}, ["data keys are not searched"]),
        ({"optim.lr": {"low": 0.1, "high": 0.01}}, ["low (0.1) must be below high (0.01)"]),
        ({"optim.lr": {"low": 0.0, "high": 0.1, "log": True}}, ["log scale needs low above 0"]),
        ({"optim.lr": {"lo": 0.1, "high": 1.0}}, ["unknown field(s) lo"]),
        ({"optim.lr": [0.1, 0.2]}, ["give {low: L, high: H} or {choices: [...]}"]),
        ({"optim": {"choices": [1, 2]}}, ["optim is a section: each choice is a mapping"]),
        ({"input": {"choices": [{"heigth": 128}]}}, ["unknown config key 'input.heigth'"]),
        ({"model.encoder": {"choices": []}}, ["choices is a non-empty list"]),
        ([1, 2], ["a space is a mapping of config keys"]),
    ],
)
def test_a_malformed_space_names_the_entry_and_the_fix(content, words):
    with pytest.raises(UsageError) as caught:
        parse_space(content, "--space s.yaml")
    assert str(caught.value).startswith("--space s.yaml: ")
    assert all(word in str(caught.value) for word in words), str(caught.value)


# --- the nested sweep and its outputs -----------------------------------------------------------------------------


def test_a_study_goes_on_with_a_wider_range_and_a_new_entry(nested):
    """Optuna keeps a study's trials when a range widens or a parameter is added: such a space is not refused."""
    wider = SMALL_SPACE.replace("high: 1.0e-2", "high: 3.0e-2") + "augment.blur.p: {low: 0.0, high: 0.5}\n"
    assert parse_space(yaml.safe_load(wider), "wider.yaml").clashes_with_study(load_study(nested["study"])) == []
    recast = SMALL_SPACE.replace("augment.hflip.p: {low: 0.0, high: 0.5}", "augment.hflip.p: {choices: [0.0, 0.5]}")
    (reason,) = parse_space(yaml.safe_load(recast), "recast.yaml").clashes_with_study(load_study(nested["study"]))
    assert reason == "augment.hflip.p is a list of choices here but a range of numbers in the study"


def test_a_two_trial_sweep_prints_a_line_per_trial_and_both_figures(nested):
    lines = [line for line in nested["err"].splitlines() if line.startswith("trial ")]
    assert len(lines) == 2, nested["err"]
    assert re.fullmatch(r"trial 1/2 \(#0\): 0\.\d{4} \(best 0\.\d{4}, trial #0\), \d+\.\d min, ETA \d+\.\d min", lines[0]), lines[0]
    assert re.fullmatch(r"trial 2/2 \(#1\): 0\.\d{4} \(best 0\.\d{4}, trial #[01]\), \d+\.\d min, ETA none: done", lines[1]), lines[1]
    assert "cross-fitted score" in nested["out"] and "(optimistic: the best of 2)" in nested["out"]
    assert re.search(r"outer fold 0 of 4 \(2 frames no trial saw\): \d\.\d{4}", nested["out"]), nested["out"]
    assert "Traceback" not in nested["err"]


def test_trials_csv_has_a_row_per_trial_with_its_fold_scores(nested):
    rows = read_trials(nested["study"])
    assert [row["trial"] for row in rows] == ["0", "1"]
    for row in rows:
        assert row["state"] == "COMPLETE" and 0 <= float(row["value"]) <= 1 and float(row["tuned_on_all"]) >= 0
        assert len(row["fold_scores"].split(";")) == 2 and float(row["minutes"]) > 0
        assert float(row["optim.lr"]) > 0 and row["augment.hflip.p"] != ""
        folder = Path(row["folder"])
        assert (folder / "postprocess.json").is_file() and (folder / "fold_1" / "metrics.csv").is_file()
        assert not list(folder.glob("fold_*/checkpoints")), "a scored trial keeps no checkpoints"


def test_best_yaml_is_a_config_that_train_accepts(nested, tiny, tmp_path):
    best = nested["study"] / "best.yaml"
    config = load_config("default", best)
    rows = read_trials(nested["study"])
    winner = max(rows, key=lambda row: float(row["value"]))
    assert config.optim.lr == pytest.approx(float(winner["optim.lr"]))
    assert (config.split.n_folds, config.split.fold, config.trainer.tune_after) == (2, None, True)
    assert config.data.mask_value == 1 and config.data.exclude is None  # the outer fold's exclusions are the sweep's, not the config's
    run = tmp_path / "run"
    code, out, err = run_main(["train", str(tiny), "--out", str(run), "--config", str(best), "--fold", "0", "--quiet", "--no-report"])
    assert code == 0, out + err
    assert (run / "checkpoints" / "best.ckpt").is_file()


def test_the_outer_fold_is_scored_on_frames_no_trial_saw(nested, tiny):
    study = nested["study"]
    outer = json.loads((study / "outer" / "outer.json").read_text())
    held = set(outer["frames"])
    assert len(held) == 2 and held <= set(FRAMES)
    assert held == set(load_study(study).user_attrs["medseg_sweep"]["outer_ids"])
    trained = [Path(row["folder"]) for row in read_trials(study)] + [Path(outer["run"])]
    for folder in trained:
        split = json.loads((folder / "split.json").read_text())
        seen = {sample_id for fold in split["folds"] for sample_id in fold}
        assert not seen & held, f"{folder} trained or validated on an outer frame"
        assert seen == set(FRAMES) - held
        assert set(json.loads((folder / "run.json").read_text())["excluded"]) == held
    assert {row["id"] for row in outer["per_frame"]} == held
    assert outer["score"] == pytest.approx(sum(row["dice"] for row in outer["per_frame"]) / 2, abs=1e-5)
    assert outer["trial"] == int(max(read_trials(study), key=lambda row: float(row["value"]))["trial"])


def test_the_study_page_opens_in_chromium_with_its_plots_and_nothing_from_the_network(nested):
    page_file = nested["study"] / "study.html"
    errors: list[str] = []
    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: None if request.url.startswith(("file:", "data:")) else outside.append(request.url))
            page.route(NETWORK, lambda route: route.abort())
            page.goto(page_file.as_uri(), wait_until="load")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4")
            plots = page.evaluate("document.querySelectorAll('.js-plotly-plot').length")
            sections = page.evaluate("Array.from(document.querySelectorAll('section'), s => s.id)")
            text = page.inner_text("#headline")
            page.screenshot(path=str(artefact_path("study.png")), full_page=True)
        finally:
            browser.close()
    assert not outside and not errors, (outside, errors)
    assert plots == 4, plots  # history, fold scores, importances, slices
    assert sections == ["headline", "best", "space", "history", "folds", "importance", "slices", "trials"]
    assert "best trial's cross-fitted score (optimistic: the best of 2)" in text
    assert "outer fold 0 of 4 (2 frames no trial saw)" in text


class _Sources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [
            f"{tag} {name}={value}" for name, value in attrs if name in ("src", "href") and not (value or "").startswith("data:")
        ]


def test_the_study_page_is_self_contained(nested):
    text = (nested["study"] / "study.html").read_text(encoding="utf-8")
    parser = _Sources()
    parser.feed(text)
    assert not parser.found, parser.found
    assert text.count("<script") >= 4 and "plotly" in text.lower()  # plotly.js inline, once


# --- failed, pruned and interrupted trials ------------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True])
def test_a_trial_that_fails_on_its_configuration_is_recorded_and_the_sweep_goes_on(tiny, tmp_path, quiet):
    space = write_space(tmp_path / "bad.yaml", BAD_SPACE)
    study = tmp_path / "study"
    code, out, err = run_main(sweep_args(tiny, study, space, "--trials", "2", *(["--quiet"] if quiet else [])))
    assert code == 1 and "Traceback" not in out + err, out + err
    assert err.strip().splitlines()[-1].startswith("error: no trial of the study completed")
    lines = [line for line in err.splitlines() if line.startswith("trial ")]
    assert len(lines) == (0 if quiet else 2), err
    assert quiet or lines[1].startswith(f"trial 2/2 (#1): failed: {REFUSED}")
    rows = read_trials(study)
    assert [row["state"] for row in rows] == ["FAIL", "FAIL"]
    assert all(row["reason"].startswith(REFUSED) for row in rows)
    assert "2 fail" in out and not (study / "best.yaml").exists() and (study / "study.html").is_file()


def test_failed_and_pruned_trials_are_recorded_with_their_reasons(tiny, tmp_path):
    """Trial 0 draws an encoder training refuses; trial 1 trains, and a threshold pruner stops it after fold 0."""
    space = write_space(tmp_path / "space.yaml", "model.encoder: {choices: [resnet-nosuch, resnet18]}\n")
    study = tmp_path / "study"
    study.mkdir()
    with sweep_study._quiet_optuna():
        created = optuna.create_study(study_name="medseg", storage=f"sqlite:///{study / 'study.db'}", direction="maximize")
        created.enqueue_trial({"model.encoder": "resnet-nosuch"})
        created.enqueue_trial({"model.encoder": "resnet18"})
    lines: list[str] = []
    result = run_sweep(request(tiny, study, space, trials=2, pruner=optuna.pruners.ThresholdPruner(lower=1.5)), on_message=lines.append)
    assert result.counts == {"FAIL": 1, "PRUNED": 1} and result.best is None and result.added == 2
    failed, pruned = read_trials(study)
    assert (failed["state"], failed["model.encoder"]) == ("FAIL", "resnet-nosuch")
    assert failed["reason"].startswith("unknown encoder 'resnet-nosuch' (model.encoder)")
    assert (pruned["state"], pruned["model.encoder"]) == ("PRUNED", "resnet18") and pruned["reason"].startswith("pruned after fold 0")
    assert len(pruned["fold_scores"].split(";")) == 1
    assert not (Path(pruned["folder"]) / "fold_1").exists(), "a pruned trial trains no further fold"
    assert lines[0].startswith("trial 1/2 (#0): failed: unknown encoder 'resnet-nosuch'")
    assert lines[1].startswith("trial 2/2 (#1): pruned after fold 0") and "no trial completed yet" in lines[1]


def test_a_trial_left_running_by_a_killed_sweep_is_failed_when_the_next_one_starts(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_study, "HEARTBEAT_S", 1)
    monkeypatch.setattr(sweep_study, "GRACE_S", 1)
    space = write_space(tmp_path / "bad.yaml", BAD_SPACE)
    study = tmp_path / "study"
    study.mkdir()
    with sweep_study._quiet_optuna():
        storage = open_storage(f"sqlite:///{study / 'study.db'}", "test")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Optuna's: heartbeats are meant for Study.optimize, as the sweep uses them
            killed = optuna.create_study(study_name="medseg", storage=storage, direction="maximize").ask()  # its process died
        storage.record_heartbeat(killed._trial_id)
    time.sleep(2.5)
    result = run_sweep(request(tiny, study, space, trials=1), on_message=lambda line: None)
    assert result.counts == {"FAIL": 2} and result.added == 1
    first, second = read_trials(study)
    assert first["state"] == "FAIL" and first["reason"].startswith("interrupted: its process stopped")
    assert second["trial"] == "1" and second["reason"].startswith(REFUSED)


# --- several processes, one study ---------------------------------------------------------------------------------


def test_two_processes_add_trials_to_one_sqlite_study(tiny, tmp_path):
    assert SCRIPT is not None, f"no medseg console script beside {sys.executable}"
    space = write_space(tmp_path / "space.yaml", "optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    study = tmp_path / "study"
    command = [SCRIPT, *sweep_args(tiny, study, space, "--trials", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core each: two processes on this 2-core machine, not four threads fighting
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, out + err
        assert "1 added now" in out and "Traceback" not in err, out + err
    trials = load_study(study).get_trials()
    assert sorted(trial.number for trial in trials) == [0, 1]
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert len(read_trials(study)) == 2


# --- the user's mistakes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, shared_data) -> Path:
    return make_tiny(tmp_path_factory.mktemp("other") / "tiny", shared_data)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("trials_0", ["--trials 0: run at least 1 trial"]),
        ("space_not_yaml", ["not valid YAML", "space.yaml"]),
        ("space_unknown_key", ["unknown config key 'optim.lrr'", "space.yaml"]),
        ("set_and_space", ["--set optim.lr and the search space", "both set optim.lr; drop one of them"]),
        ("ddp", ["a sweep trains each trial on one device", "CUDA_VISIBLE_DEVICES=K"]),
        ("bad_storage", ["--storage nonsense: not a storage URL Optuna can use", "sqlite:///"]),
        ("foreign_folder", ["holds other files", "choose a new or empty folder"]),
        ("outer_fold_out_of_range", ["--outer-fold 4: choose a fold from 0 to 3"]),
        ("too_many_folds", ["--folds 7: only 6 subjects (groups) for 7 folds", "(outside the outer fold)"]),
        ("too_many_outer_folds", ["--outer-folds 9: only 8 subjects (groups) for 9 folds; lower --outer-folds to at most 8"]),
        ("other_data", ["a sweep of", "sweep the same DATA or choose another --out"]),
        ("other_folds", ["--folds 3: the study's trials are scored on 2 folds", "use --folds 2"]),
        ("outer_fold_dropped", ["keeps outer fold 0 of 4 out of every trial", "--outer-fold 0 --outer-folds 4"]),
        ("space_of_choices", ["does not fit study 'medseg'", "optim.lr is a list of choices here but a range of numbers"]),
        ("space_on_a_linear_scale", ["optim.lr is drawn on a linear scale here but a log one", "another --out or --study-name"]),
    ],
)
def test_each_mistake_is_one_error_line(case, words, nested, tiny, other_data, tmp_path):
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    study, data, extra = tmp_path / "study", tiny, []
    if case == "trials_0":
        extra = ["--trials", "0"]
    elif case == "space_not_yaml":
        write_space(space, "optim.lr: {low: [\n")
    elif case == "space_unknown_key":
        write_space(space, "optim.lrr: {low: 0.1, high: 1.0}\n")
    elif case == "set_and_space":
        extra = ["--set", "optim.lr=0.01"]
    elif case == "ddp":
        extra = ["--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"]
    elif case == "bad_storage":
        extra = ["--storage", "nonsense"]
    elif case == "foreign_folder":
        study.mkdir()
        (study / "notes.txt").write_text("mine")
    elif case == "outer_fold_out_of_range":
        extra = ["--outer-fold", "4", "--outer-folds", "4"]
    elif case == "too_many_folds":
        extra = ["--outer-fold", "1", "--outer-folds", "4"]
    elif case == "too_many_outer_folds":
        extra = ["--outer-fold", "1", "--outer-folds", "9"]
    else:  # mistakes about the nested study, which they must leave as it was
        study = nested["study"]
        data = other_data if case == "other_data" else tiny
        extra = ["--outer-fold", "0", "--outer-folds", "4"] if case == "other_folds" else []
        if case.startswith("space_"):
            lr = "{choices: [0.001, 0.01]}" if case == "space_of_choices" else "{low: 1.0e-4, high: 1.0e-2}"
            write_space(space, SMALL_SPACE.replace("{low: 1.0e-4, high: 1.0e-2, log: true}", lr, 1))
    args = sweep_args(data, study, space, *extra, folds={"other_folds": "3", "too_many_folds": "7"}.get(case, "2"))
    before = read_trials(nested["study"])
    code, out, err = run_main(args)
    if case.startswith("too_many"):  # the study is not bound to folds it cannot use: the corrected command works on it
        assert "medseg_sweep" not in load_study(study).user_attrs
    if case == "bad_storage":  # nor is STUDY bound to a storage that does not work
        assert not (study / "sweep.json").exists()
    assert code == 2 and "Traceback" not in out + err, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), err
    assert read_trials(nested["study"]) == before
