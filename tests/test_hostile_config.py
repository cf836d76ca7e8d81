"""Hostile and careless configurations and run files (issue 31), met through the command line where the user meets them.

Each class of problem has a crafted input: YAML that expands to gigabytes through anchors and aliases (in
``--config``, in ``RUN/config.yaml``, in ``sweep --space``), JSON nested or sized beyond reason, numbers out of
range (infinite learning rates, NaN windows, seeds numpy refuses, negative batch limits, infinite blur), trainer
settings Lightning refuses (``--strategy nonsense``, ``--devices abc``), post-processing and run plans out of
range, and a loss that is not finite. Each must end in one ``error:`` line and a non-zero exit within seconds, a
refused training must leave nothing behind (``--dry-run`` and the real run alike), and no traceback may show.
The property tests throw generated numbers and dicts at the configuration and the run-file models.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import TINY_OVERRIDES, constant_loss, set_args
from medseg import config, files, runs
from medseg.cli import main
from medseg.errors import UsageError
from medseg.files import is_safe_name
from medseg.learn import fit
from medseg.learn import module as engine_module
from medseg.learn.module import NonFiniteLossError

FAST_S = 5.0  # a refusal takes well under a second; this bound only catches a hang or a blow-up
SCRIPT = Path(sys.executable).parent / "medseg"


def billion_laughs(levels: int = 12) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**levels strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\ntrainer: {{max_epochs: *a{levels - 1}}}\n"


def laughs_flow(levels: int = 12) -> str:
    """The same as one flow value, for ``--set``."""
    inner = '&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'
    for i in range(1, levels):
        inner = f"&a{i} [{inner}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return inner


def run_cli(capsys, *args: str) -> tuple[int, str, float]:
    """Run ``medseg ARGS`` in-process; return the exit code, stderr and the seconds it took."""
    start = time.perf_counter()
    code = main(list(args))
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err, seconds


def one_error_line(err: str, *words: str) -> str:
    """stderr's single ``error:`` line (warnings aside), holding every word."""
    errors = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    """A tiny CPU training (it never gets to train in these tests); ``extra`` last, so that its --set wins."""
    base = ["train", str(data), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
    return [*base, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1", "trainer.limit_train_batches=1"), *extra]


@pytest.fixture
def uns_mini(shared_data) -> Path:
    return shared_data / "uns-mini"


def make_run(folder: Path, data: Path, plan: dict | None = None, tuning: dict | None = None) -> Path:
    """A hand-made run folder: ``run.json``, ``config.yaml``, an (empty) best checkpoint, and ``postprocess.json`` if given."""
    (folder / "checkpoints").mkdir(parents=True)
    plan = {"data": str(data), "n_folds": 5, "folds": [0], "several": False} if plan is None else plan
    (folder / runs.RUN_FILE).write_text(json.dumps(plan))
    config.save_config(config.load_config("cpu", overrides=list(TINY_OVERRIDES)), folder / runs.CONFIG_FILE)
    (folder / "checkpoints" / runs.BEST).write_bytes(b"")
    if tuning is not None:
        (folder / runs.POSTPROCESS_FILE).write_text(json.dumps(tuning))
    return folder


# --- 1. Bounded reads: YAML aliases, JSON nesting and size ----------------------------------------------------------


def test_billion_laughs_in_config_is_one_line_and_fast(tmp_path, capsys, uns_mini):
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(billion_laughs())
    code, err, seconds = run_cli(capsys, *train_args(uns_mini, tmp_path / "run", "--config", str(laughs), "--dry-run"))
    assert code == 2 and seconds < FAST_S
    one_error_line(err, str(laughs), "anchors and aliases", "write the values out")
    assert not (tmp_path / "run").exists()


def test_billion_laughs_in_config_through_the_console_script(tmp_path, uns_mini):
    """The installed script as a user runs it: it ends, quickly, instead of growing to gigabytes."""
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(billion_laughs())
    result = subprocess.run(
        [str(SCRIPT), *train_args(uns_mini, tmp_path / "run", "--config", str(laughs))],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    one_error_line(result.stderr, "anchors and aliases")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["report", "tune", "evaluate", "predict", "export"])
def test_billion_laughs_in_a_run_config_is_one_line_naming_it(tmp_path, capsys, uns_mini, command):
    run = make_run(tmp_path / "run", uns_mini)
    (run / runs.CONFIG_FILE).write_text(billion_laughs())
    extra = {
        "report": [],
        "tune": [],
        "evaluate": [str(uns_mini)],
        "predict": [str(uns_mini / "test"), "--out", str(tmp_path / "sub.csv")],
        "export": ["--onnx", str(tmp_path / "model.onnx")],
    }[command]
    code, err, seconds = run_cli(capsys, command, str(run), *extra)
    assert code == 2 and seconds < FAST_S
    one_error_line(err, str(run / runs.CONFIG_FILE), "anchors and aliases")


def test_billion_laughs_in_a_search_space_is_one_line(tmp_path, capsys, uns_mini):
    space = tmp_path / "space.yaml"
    space.write_text(billion_laughs().replace("trainer: {max_epochs: *a11}", "optim.lr: {choices: *a11}"))
    code, err, seconds = run_cli(capsys, "sweep", str(uns_mini), "--out", str(tmp_path / "study"), "--space", str(space), "--trials", "1")
    assert code == 2 and seconds < FAST_S
    one_error_line(err, f"--space {space}", "anchors and aliases")
    assert not (tmp_path / "study").exists()


def test_aliases_in_a_set_value_are_text_and_never_expand():
    """``--set`` takes a value that is not plain YAML as text: typed keys refuse it, in one line, at once."""
    start = time.perf_counter()
    with pytest.raises(UsageError, match="trainer.max_epochs"):
        config.load_config(overrides=[f"trainer.max_epochs={laughs_flow()}"])
    loaded = config.load_config(overrides=[f"model.encoder={laughs_flow()}"])
    assert loaded.model.encoder == laughs_flow() and time.perf_counter() - start < FAST_S


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("a: 2020-13-45\n", ["a value cannot be read", "month must be in 1..12"]),
        ("trainer: {max_epochs: " + "1" * 5000 + "}\n", ["a value cannot be read", "digits"]),
        ("- just\n- a list\n", ["a config file is a mapping of sections"]),
        ("[" * 5000 + "]" * 5000 + "\n", ["nested deeper than 64 levels"]),
    ],
    ids=["bad_date", "huge_int", "list", "deep"],
)
def test_config_files_python_cannot_hold_are_one_line(tmp_path, capsys, uns_mini, content, words):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    code, err, seconds = run_cli(capsys, *train_args(uns_mini, tmp_path / "run", "--config", str(path), "--dry-run"))
    assert code == 2 and seconds < FAST_S
    one_error_line(err, str(path), *words)


def test_an_oversized_config_is_refused_before_it_is_read(tmp_path, capsys, uns_mini):
    path = tmp_path / "config.yaml"
    with open(path, "wb") as handle:
        handle.truncate(files.CONFIG_BYTES + 1)  # sparse: the size is what counts
    code, err, seconds = run_cli(capsys, *train_args(uns_mini, tmp_path / "run", "--config", str(path), "--dry-run"))
    assert code == 2 and seconds < FAST_S
    one_error_line(err, str(path), "more than a configuration can be")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, ["nested too deeply", "the run folder is damaged"]),
        (None, ["more than a run file can be"]),
        ('{"data": "x", "n_folds": 5, "folds": [0], "several": false, "train_non_empty": ' + "1" * 5000 + "}", ["unreadable", "damaged"]),
        ("[1, 2, 3]", ["not a valid RunPlan file"]),
        ("42", ["not a valid RunPlan file"]),
    ],
    ids=["deep", "oversized", "huge_int", "list", "number"],
)
def test_hostile_run_json_is_one_line(tmp_path, capsys, uns_mini, content, words):
    run = make_run(tmp_path / "run", uns_mini)
    if content is None:
        with open(run / runs.RUN_FILE, "wb") as handle:
            handle.truncate(64 * 1024 * 1024 + 1)
    else:
        (run / runs.RUN_FILE).write_text(content)
    code, err, seconds = run_cli(capsys, "report", str(run))
    assert code == 2 and seconds < FAST_S
    one_error_line(err, str(run / runs.RUN_FILE), *words)


def test_a_damaged_metrics_table_is_one_line(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,train_loss,val_loss,val_score,lr,images_per_s,epoch_seconds\n1,0.5,oops,0.7,0.001,10,1\n")
    with pytest.raises(UsageError, match=r"metrics.csv: line 2: val_loss 'oops' is not a number"):
        runs.read_metrics(path)
    path.write_text("epoch,train_loss\n-3,0.5\n")
    with pytest.raises(UsageError, match="is not an epoch number"):
        runs.read_metrics(path)


# --- 2 and 3. Range checks and trainer settings: the dry run and the real run refuse alike, before any write ----------

REFUSED_SETTINGS = [
    (["--set", "optim.lr=.inf"], ["optim.lr", "finite"]),
    (["--set", "optim.lr=-1e-3"], ["optim.lr", "greater than 0"]),
    (["--set", "data.intensity_window=[.nan, 1]"], ["data.intensity_window", "finite"]),
    (["--set", "trainer.seed=-1"], ["trainer.seed", "greater than or equal to 0"]),
    (["--set", f"trainer.seed={2**32}"], ["trainer.seed", "less than or equal to 4294967295"]),
    (["--set", "split.seed=-5"], ["split.seed"]),
    (["--set", "trainer.limit_train_batches=-1"], ["trainer.limit_train_batches", "a fraction of them in (0, 1]"]),
    (["--set", "trainer.limit_val_batches=1.5"], ["trainer.limit_val_batches"]),
    (["--set", "augment.blur.sigma_max=.inf"], ["augment.blur.sigma_max", "finite"]),
    (["--set", "augment.elastic.sigma=1e9"], ["augment.elastic.sigma", "less than or equal to 100"]),
    (["--set", f"trainer.max_epochs={10**30}"], ["trainer.max_epochs", "less than or equal to 100000"]),
    (["--set", "trainer.batch_size=1000000000"], ["trainer.batch_size", "less than or equal to 4096"]),
    (["--set", "trainer.num_workers=100000"], ["trainer.num_workers"]),
    (["--set", "loss.class_weights=[.nan]"], ["loss.class_weights", "finite"]),
    (["--set", "model.dropout=.nan"], ["model.dropout", "finite"]),
    (["--set", "split.n_folds=1000000"], ["split.n_folds"]),
    (["--classes", "../../etc=1"], ["--classes", "'../../etc' cannot become a file name", "letters, digits"]),
    (["--set", "data.classes={'a/b': 1}"], ["data.classes", "'a/b' cannot become a file name"]),
    (["--set", 'data.exclude="a\\0b"'], ["data.exclude", "not a file path"]),
    (["--devices", "abc"], ["trainer.devices", "a number of devices"]),
    (["--devices", "0"], ["trainer.devices", "a number of devices"]),
    (["--strategy", "nonsense"], ["trainer.strategy='nonsense'", "not a Lightning strategy", "ddp_spawn"]),
    (["--strategy", "deepspeed"], ["Lightning refuses", "trainer.strategy='deepspeed'", "DeepSpeed"]),
    (["--devices", "0,1"], ["Lightning refuses", "trainer.devices=[0, 1]", "CPUAccelerator"]),
    (["--folds", "100000"], ["--folds 100000", "2 to 1000"]),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "real_run"])
@pytest.mark.parametrize(("extra", "words"), REFUSED_SETTINGS, ids=[" ".join(extra) for extra, _ in REFUSED_SETTINGS])
def test_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys, uns_mini, extra, words, dry_run):
    run = tmp_path / "run"
    code, err, seconds = run_cli(capsys, *train_args(uns_mini, run, *extra), *(["--dry-run"] if dry_run else []))
    assert code == 2 and seconds < FAST_S
    one_error_line(err, *words)
    assert not run.exists(), f"a refused run left {sorted(p.name for p in run.rglob('*'))}"


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "real_run"])
def test_a_gpu_run_without_a_gpu_is_refused_before_anything_is_written(tmp_path, capsys, uns_mini, dry_run, monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    for accelerator in (CUDAAccelerator, MPSAccelerator):  # a machine without a GPU, also where the test runs on one
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    code, err, _ = run_cli(capsys, *train_args(uns_mini, run, "--set", "trainer.accelerator=gpu"), *(["--dry-run"] if dry_run else []))
    assert code == 2
    one_error_line(err, "Lightning refuses", "trainer.accelerator='gpu'", "No supported gpu backend found")
    assert not run.exists()


def test_check_trainer_takes_what_lightning_takes():
    for overrides in ([], ["trainer.devices=2", "trainer.strategy=ddp"], ["trainer.strategy=DDP_spawn", "trainer.devices=2"]):
        fit.check_trainer(config.load_config("cpu", overrides=[*TINY_OVERRIDES, *overrides]))


def test_sweep_refuses_a_seed_numpy_refuses(tmp_path, capsys, uns_mini):
    code, err, seconds = run_cli(capsys, "sweep", str(uns_mini), "--out", str(tmp_path / "study"), "--seed", "-1")
    assert code == 2 and seconds < FAST_S
    one_error_line(err, "--seed -1", "0 to 4294967295")


def test_a_search_space_of_infinite_numbers_is_refused(tmp_path, capsys, uns_mini):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 1.0e-4, high: .inf}\n")
    code, err, _ = run_cli(capsys, "sweep", str(uns_mini), "--out", str(tmp_path / "study"), "--space", str(space))
    assert code == 2
    one_error_line(err, "optim.lr: high must be a finite number")


# --- 2. Run files out of range --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tuning", "words"),
    [
        ({"threshold": math.nan, "min_area": 0}, ["threshold: Input should be a finite number"]),
        ({"threshold": -1, "min_area": 0}, ["threshold: Input should be greater than or equal to 0"]),
        ({"threshold": 2, "min_area": 0}, ["threshold: Input should be less than or equal to 1"]),
        ({"threshold": 0.5, "min_area": -10}, ["min_area: Input should be greater than or equal to 0"]),
        ({"threshold": 0.5, "min_area": 10**12}, ["min_area: Input should be less than or equal to 2147483647"]),
        ({"threshold": 0.5, "min_area": 0, "presence_threshold": math.inf}, ["presence_threshold"]),
        ({"threshold": 0.5, "min_area": 0, "thresholds": [0.5], "min_areas": [0, 10], "scores": [[0.5]]}, ["one column per minimum area"]),
        ({"threshold": 0.5, "min_area": 0, "score_after": math.nan}, ["score_after"]),
    ],
    ids=["nan", "negative", "above_one", "negative_area", "huge_area", "infinite_presence", "ragged_grid", "nan_score"],
)
def test_postprocess_out_of_range_is_one_line_naming_the_file_and_key(tmp_path, capsys, uns_mini, tuning, words):
    run = make_run(tmp_path / "run", uns_mini, tuning=tuning)
    code, err, seconds = run_cli(capsys, "report", str(run))
    assert code == 2 and seconds < FAST_S
    line = one_error_line(err, str(run / runs.POSTPROCESS_FILE), "not a valid Tuning file", *words)
    assert "collapsed" not in line


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"folds": []}, ["folds: List should have at least 1 item"]),
        ({"folds": [5]}, ["folds [5] are not folds of a 5-fold split"]),
        ({"folds": [0, 0], "several": True}, ["lists a fold twice"]),
        ({"folds": [0, 1], "several": False}, ["trains one fold, not 2"]),
        ({"n_folds": 10**9}, ["n_folds"]),
        ({"classes": ["../../evil", "b"]}, ["cannot become a file name", "letters, digits"]),
        ({"classes": ["a", "b"], "class_labels": {"a/b": "1"}}, ["class_labels", "cannot become a file name"]),
        ({"classes": ["a", "b"], "class_values": {"c": 1}}, ["class_values names ['c']"]),
    ],
    ids=["no_folds", "fold_outside", "fold_twice", "several_false", "huge_n_folds", "class_path", "label_key", "unknown_class"],
)
def test_a_run_plan_out_of_range_is_one_line_naming_it(tmp_path, capsys, uns_mini, change, words):
    plan = {"data": str(uns_mini), "n_folds": 5, "folds": [0], "several": False} | change
    run = make_run(tmp_path / "run", uns_mini, plan=plan)
    code, err, seconds = run_cli(capsys, "report", str(run))
    assert code == 2 and seconds < FAST_S
    one_error_line(err, str(run / runs.RUN_FILE), "not a valid RunPlan file", *words)


def test_a_run_plan_that_contradicts_the_config_is_one_line(tmp_path, capsys, uns_mini):
    plan = {"data": str(uns_mini), "n_folds": 3, "folds": [0], "several": False}
    run = make_run(tmp_path / "run", uns_mini, plan=plan)
    code, err, _ = run_cli(capsys, "report", str(run))
    assert code == 2
    one_error_line(err, "run.json and config.yaml disagree", "n_folds 3 against split.n_folds 5")


def test_structures_tuning_must_name_the_runs_structures(tmp_path, uns_mini):
    plan = {"data": str(uns_mini), "n_folds": 5, "folds": [0], "several": False, "classes": ["a", "b"]}
    block = {"threshold": 0.5, "min_area": 0}
    tuning = {
        "classes": {"a": block, "c": block},
        "score_before": 0.5,
        "score_after": 0.6,
        "frames": 3,
        "out_of_fold": False,
        "tta": "none",
    }
    run = make_run(tmp_path / "run", uns_mini, plan=plan, tuning=tuning)
    (run / runs.CONFIG_FILE).write_text((run / runs.CONFIG_FILE).read_text().replace("structures: 1", "structures: 2"))
    with pytest.raises(UsageError, match=r"tunes the structures \['a', 'c'\], but the run has \['a', 'b'\]"):
        runs.open_run(run).tuning()


# --- 4. A loss that is not finite says which checkpoints exist -------------------------------------------------------


def test_a_nan_loss_in_the_first_steps_points_at_the_data_and_claims_no_checkpoint(tmp_path):
    line = fit.nonfinite_message(
        NonFiniteLossError("training loss is nan at epoch 1, step 1", "training", 0, 0),
        runs.FoldDir(0, tmp_path),
        config.load_config("cpu"),
    )
    assert "no checkpoint is kept" in line and "last good" not in line and "kept:" not in line
    assert "`medseg inspect DATA` lists them" in line and "lower optim.lr (now 0.0015)" in line


def test_a_nan_loss_later_names_the_checkpoints_kept(tmp_path):
    fold = runs.FoldDir(0, tmp_path)
    fold.checkpoints.mkdir()
    fold.best.write_bytes(b"x")
    fold.last.write_bytes(b"x")
    line = fit.nonfinite_message(
        NonFiniteLossError("training loss is inf at epoch 3, step 40", "training", 2, 39), fold, config.load_config()
    )
    assert f"kept: {fold.best} (lowest validation loss) and {fold.last} (end of the last epoch)" in line
    assert "medseg inspect" not in line and "optim.lr" in line


def test_a_nan_loss_through_the_cli_is_one_line_without_a_false_checkpoint(tmp_path, capsys, small_kaggle_copy, monkeypatch):
    monkeypatch.setattr(engine_module, "create_loss", constant_loss(float("nan")))
    data = small_kaggle_copy(train_ids=("1_1", "1_2", "2_1", "2_2", "3_1", "4_1", "5_1", "6_1"))
    code, err, _ = run_cli(capsys, *train_args(data, tmp_path / "run"))
    assert code == 1
    one_error_line(err, "training loss is nan at epoch 1, step 1", "no checkpoint is kept", "medseg inspect DATA", "optim.lr")


# --- 5. Property tests: generated numbers and dicts -----------------------------------------------------------------

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    leaves: dict[str, object] = {}
    for key, value in tree.items():
        leaves |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return leaves


NUMERIC_KEYS = sorted(
    {key for key, value in _leaves(config.Config().model_dump()).items() if isinstance(value, int | float) and not isinstance(value, bool)}
    | {
        "augment.blur.sigma_max",
        "augment.elastic.sigma",
        "augment.elastic.alpha",
        "augment.coarse_dropout.max_holes",
        "trainer.gradient_clip",
        "trainer.num_workers",
        "trainer.limit_train_batches",
        "trainer.limit_val_batches",
        "trainer.devices",
        "data.mask_value",
        "data.mask_threshold",
        "split.fold",
    }
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 0.5, 1.0, 2**31 - 1, 2**32 - 1, 2**32, 10**30, -(10**30), 1e308, -0.0, 5e-324]),
)


def _yaml_number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


def _numbers_in(tree: object) -> list[float | int]:
    if isinstance(tree, dict):
        return [number for value in tree.values() for number in _numbers_in(value)]
    if isinstance(tree, list | tuple):
        return [number for value in tree for number in _numbers_in(value)]
    return [tree] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


@PROPERTY
@given(key=st.sampled_from(NUMERIC_KEYS), value=numbers, preset=st.sampled_from(["default", "cpu"]))
def test_generated_numbers_give_a_finite_config_or_a_usage_error(key, value, preset):
    try:
        loaded = config.load_config(preset, overrides=[f"{key}={_yaml_number(value)}"])
    except UsageError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    tree = loaded.model_dump()
    assert all(math.isfinite(number) for number in _numbers_in(tree)), (key, value)
    tree["data"].pop("max_pixels", None)  # a limit, not a count: a large one only lets larger frames in
    assert all(abs(number) <= 2**32 for number in _numbers_in(tree) if isinstance(number, int)), (
        key,
        value,
    )  # counts and seeds are bounded
    assert 0 <= loaded.trainer.seed <= config.SEED_MAX and 0 <= loaded.split.seed <= config.SEED_MAX


@PROPERTY
@given(low=numbers, high=numbers)
def test_generated_intensity_windows_are_finite_or_refused(low, high):
    try:
        loaded = config.load_config(overrides=[f"data.intensity_window=[{_yaml_number(low)}, {_yaml_number(high)}]"])
    except UsageError:
        return
    window = loaded.data.intensity_window
    assert all(math.isfinite(bound) for bound in window) and window[0] < window[1]


floats_and_more = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=5))
tuning_dicts = st.fixed_dictionaries(
    {"threshold": floats_and_more, "min_area": floats_and_more},
    optional={
        "presence_threshold": floats_and_more,
        "score_before": floats_and_more,
        "score_after": floats_and_more,
        "cross_fitted": floats_and_more,
        "frames": floats_and_more,
        "thresholds": st.lists(floats_and_more, max_size=3),
        "min_areas": st.lists(floats_and_more, max_size=3),
        "scores": st.lists(st.lists(floats_and_more, max_size=3), max_size=3),
        "presence_thresholds": st.lists(floats_and_more, max_size=3),
        "presence_scores": st.lists(floats_and_more, max_size=3),
        "bogus": floats_and_more,
    },
)


@PROPERTY
@given(content=tuning_dicts)
def test_generated_tunings_are_in_range_or_refused(content):
    try:
        tuning = runs.Tuning.model_validate(content)
    except ValidationError:
        return
    for value in (tuning.threshold, tuning.presence_threshold, *tuning.thresholds, *tuning.presence_thresholds):
        assert 0.0 <= value <= 1.0
    for value in (
        tuning.score_before,
        tuning.score_after,
        tuning.cross_fitted,
        *tuning.presence_scores,
        *(score for row in tuning.scores for score in row),
    ):
        assert value is None or 0.0 <= value <= 1.0
    assert all(0 <= area <= runs.MAX_AREA for area in (tuning.min_area, *tuning.min_areas))
    if tuning.scores:
        assert len(tuning.scores) == len(tuning.thresholds) and all(len(row) == len(tuning.min_areas) for row in tuning.scores)


names = st.one_of(st.sampled_from(["nerve", "a", "b", "..", ".", "-x", "a/b", "", "x" * 200]), st.text(max_size=8))
plan_dicts = st.fixed_dictionaries(
    {"data": st.just("/data"), "n_folds": st.one_of(st.integers(-3, 12), numbers), "folds": st.lists(st.integers(-2, 12), max_size=4)},
    optional={
        "several": st.booleans(),
        "classes": st.lists(names, max_size=3),
        "class_labels": st.dictionaries(names, st.text(max_size=3), max_size=2),
        "class_values": st.dictionaries(names, st.integers(-5, 2**33), max_size=2),
        "class_non_empty": st.dictionaries(names, st.integers(-5, 50), max_size=2),
        "train_non_empty": st.one_of(st.none(), st.integers(-5, 50)),
    },
)


@PROPERTY
@given(content=plan_dicts)
def test_generated_run_plans_are_consistent_or_refused(content):
    try:
        plan = runs.RunPlan.model_validate(content)
    except ValidationError:
        return
    assert plan.folds and len(set(plan.folds)) == len(plan.folds) and all(0 <= fold < plan.n_folds for fold in plan.folds)
    assert plan.several or len(plan.folds) == 1
    assert all(is_safe_name(name) for name in plan.classes)
    for mapping in (plan.class_labels, plan.class_values, plan.class_non_empty):
        assert set(mapping) <= set(plan.classes)


def test_the_seed_bound_is_what_lightning_takes():
    import lightning

    lightning.seed_everything(config.SEED_MAX, verbose=False)
    with pytest.raises(ValueError, match="not in bounds"):
        lightning.seed_everything(config.SEED_MAX + 1, verbose=False)
