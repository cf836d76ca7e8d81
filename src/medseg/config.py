"""One typed, validated run configuration: the recipe's defaults, presets, YAML files and overrides.

The configuration is a tree of pydantic models that forbid unknown keys. It is built from a preset
(``default``: one model at 448x608, validated on one subject-grouped fifth; ``cpu``: small input and
encoder, a fixed budget of 30 epochs on a cosine schedule and the other values a sweep chose, for machines
without a GPU and for tests;
``kaggle``: the default model trained on every fold of a subject-grouped 5-fold split, tuned out-of-fold
at the end of training, predicting as a five-model ensemble), then a YAML file (``--config FILE``), then
``--set key=value`` overrides with dotted keys and YAML-typed values (``trainer.max_epochs=2``,
``augment.hflip.p=0``, ``model.encoder_weights=none``, ``split.fold=null``, lists as ``[1, 2]``). The resolved
configuration is what a run saves as ``RUN/config.yaml`` and what every later stage reads back.

Every value is range-checked where it is read: numbers are finite, seeds are what numpy takes, counts and sizes
have sane upper bounds (:data:`MAX_SIDE`, :data:`MAX_EPOCHS`, ...), and names that become paths follow
:data:`~medseg.files.NAME_RULE`. YAML is read bounded in size and without anchors or aliases (:func:`medseg.files.read_yaml`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import UsageError
from medseg.files import NAME_RULE, atomic_write, is_safe_name, parse_yaml, read_yaml, shown

PRESETS = ("default", "cpu", "kaggle")
Layout = Literal["kaggle", "folders", "rle-csv"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
# The RLE convention has one name, the dialect (medseg.data.rle): kaggle, row-major or siim. The keys rle_format (the
# dialect) and rle_order (C: row-major, the older way to name it) are the two ways a configuration or a flag names one.
Dialect = Literal["kaggle", "row-major", "siim"]
DIALECTS: tuple[str, ...] = get_args(Dialect)

SEED_MAX = 2**32 - 1  # the seeds numpy, torch and Lightning all take: 0 to 2**32 - 1
MAX_SIDE = 16384  # network input side, pixels
MAX_EPOCHS = 100_000  # also the bound of the patience settings
MAX_BATCH = 4096  # frames a batch; more does not fit a GPU at the smallest input
MAX_FOLDS = 1000  # folds of a split (leave-one-subject-out of a large study stays below it)
MAX_STRUCTURES = 256  # structures (output channels) of a model
MAX_WORKERS = 256  # DataLoader worker processes
MAX_DEVICES = 1024  # devices a machine, and machines a run
MAX_LABEL = 2**32 - 1  # mask values of class-index masks (up to 32-bit label images)
MAX_SIGMA = 100.0  # Gaussian sigma of blur and elastic warps, pixels: the kernel grows with it
MAX_ALPHA = 10_000.0  # elastic displacement scale, pixels
MAX_HOLES = 256  # coarse dropout rectangles a frame


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataOptions(_Section):
    """How a data folder is read: the ``data`` section of a configuration, and the data flags of the commands.

    Attributes:
        layout: ``kaggle``, ``folders`` or ``rle-csv``; ``None`` detects it.
        mask_value: Foreground class of class-index masks (``mask == value``).
        mask_threshold: Foreground level of anti-aliased masks (``mask > threshold``).
        subject_pattern: Regular expression whose group ``subject`` (or first group, or whole match)
            is the subject of a sample id, for the folders and rle-csv layouts.
        rle_order: ``F`` (Kaggle, column-major) or ``C`` (row-major) numbering of RLE pixels; ``C`` is the
            ``row-major`` dialect, and ``rle_format=row-major`` sets it.
        rle_format: The RLE dialect (:mod:`medseg.data.rle`): ``kaggle``, ``row-major`` or ``siim``; ``None``
            tells it from the data's RLE table (``rle_order`` C: row-major). A run saves the one it read.
        csv: The RLE table of the rle-csv layout, relative to the data folder; ``None`` finds it.
        id_column: Id column of that table; ``None`` guesses among common names.
        rle_column: RLE column of that table; ``None`` guesses among common names.
        class_column: Class column of a long RLE table (one row per frame and structure); ``None`` guesses.
        classes: Several structures per frame: each structure's name and its label in the data (the mask
            value of class-index masks, the folder of ``masks/<class>/``, the class of a long RLE table);
            ``None`` is one structure, or, for per-class mask folders and long tables, every class found.
        exclude: An exclusions file (:mod:`medseg.data.exclusions`; relative to the current folder) whose frames
            training leaves out of every fold and of tuning; ``None`` trains on every labelled frame.
        intensity_window: How frames deeper than 8 bits (16-bit PNG/TIFF, DICOM) map to [0, 1]: ``auto`` (a
            DICOM file's own window, else each frame's 0.5th-99.5th percentile), ``percentile`` (every frame,
            8-bit too), ``none`` (the full range of the pixel type) or fixed ``[low, high]`` values
            (:mod:`medseg.data.intensity`).
        max_pixels: The most pixels (height x width x frames) a frame or mask may declare in its header; a
            larger one is refused before it is decoded, as Pillow's decompression-bomb guard does. The default,
            100 million, is four times a full-field mammogram (about 4,000 x 6,000), the largest single frames
            medicine stores, and keeps a decoded frame under about 400 MB.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    layout: Layout | None = None
    mask_value: int | None = Field(None, ge=0, le=MAX_LABEL)
    mask_threshold: int | None = Field(None, ge=0, le=MAX_LABEL)
    subject_pattern: str | None = None
    rle_order: Literal["F", "C"] = "F"
    rle_format: Dialect | None = None
    csv: str | None = None
    id_column: str | None = None
    rle_column: str | None = None
    class_column: str | None = None
    classes: dict[str, int | str] | None = None
    exclude: str | None = None
    intensity_window: Literal["auto", "percentile", "none"] | tuple[float, float] = "auto"
    max_pixels: int = Field(100_000_000, ge=1)

    @field_validator("intensity_window")
    @classmethod
    def _window_not_empty(cls, value: Any) -> Any:
        if isinstance(value, tuple) and value[1] <= value[0]:
            raise ValueError(f"[{value[0]:g}, {value[1]:g}] is empty; give [low, high] with high above low, or auto, percentile, none")
        return value

    @property
    def named_dialect(self) -> Dialect | None:
        """The RLE dialect named by ``rle_format``, or by ``rle_order`` C (row-major); ``None``: to be told from the data."""
        return self.rle_format or ("row-major" if self.rle_order == "C" else None)

    @property
    def dialect(self) -> Dialect:
        """The dialect RLE is read and written in: :attr:`named_dialect`, or ``kaggle`` where nothing names or tells one."""
        return self.named_dialect or "kaggle"

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_from_text(cls, value: Any) -> Any:
        return parse_classes(value) if isinstance(value, str) else value

    @field_validator("csv", "exclude")
    @classmethod
    def _path_text(cls, value: str | None) -> str | None:
        return value if value is None else check_path_text(value)

    @field_validator("classes")
    @classmethod
    def _class_names_and_labels(cls, value: dict[str, int | str] | None) -> dict[str, int | str] | None:
        if value is None:
            return value
        if len(value) > MAX_STRUCTURES:
            raise ValueError(f"{len(value)} structures; a model has at most {MAX_STRUCTURES}")
        for name, label in value.items():
            check_class_name(name)
            if isinstance(label, int) and not 0 <= label <= MAX_LABEL:
                raise ValueError(f"class {name!r}: label {label} is not a mask value (0 to {MAX_LABEL})")
            if isinstance(label, str) and not label.strip():
                raise ValueError(f"class {name!r}: the label is empty; give its mask value, folder or class id")
        return value

    @model_validator(mode="before")
    @classmethod
    def _row_major_order(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("rle_format") == "row-major":
            return {**data, "rle_order": "C"}
        return data

    @model_validator(mode="after")
    def _one_mask_rule(self) -> DataOptions:
        if self.mask_value is not None and self.mask_threshold is not None:
            raise ValueError("mask_value and mask_threshold exclude each other (--mask-value, --mask-threshold); use one")
        if self.classes is not None and self.mask_value is not None:
            raise ValueError("classes and mask_value exclude each other (--classes, --mask-value): --mask-value picks one structure")
        if self.classes is not None and not self.classes:
            raise ValueError("classes is empty; name at least one structure, e.g. --classes nerve=1,vessel=2")
        if self.rle_format in ("kaggle", "siim") and self.rle_order == "C":
            raise ValueError(
                f"rle_format={self.rle_format} numbers pixels column-major but rle_order=C row-major (--rle-format, --rle-order); "
                "drop rle_order, or use rle_format=row-major"
            )
        return self


def check_path_text(text: str) -> str:
    """Return text that names a file when the operating system can take it as a path (no NUL byte, at most 4,096 characters).

    Raises:
        ValueError: Saying why, for pydantic to place under its key.
    """
    if "\x00" in text or len(text) > 4096:
        raise ValueError("not a file path (a NUL byte, or more than 4,096 characters); give the path of a file")
    return text


def check_class_name(name: object) -> str:
    """Return a structure's name when it may become a file name (``predict --masks-dir D/<class>/``, ``tuning_<class>.png``).

    Raises:
        ValueError: Naming the rule (:data:`~medseg.files.NAME_RULE`), for pydantic to place under its key.
    """
    if not is_safe_name(name):
        raise ValueError(f"class name {shown(name, 60)} cannot become a file name ({NAME_RULE}); rename it")
    return name


def parse_classes(text: str) -> dict[str, int | str]:
    """``nerve=1,vessel=2`` (names and their labels in the data) or ``large_bowel,stomach`` (names that are labels).

    A label of digits is a number (a mask value or a numeric class id).

    Raises:
        ValueError: If a name is empty or given twice, or a label is empty.
    """
    classes: dict[str, int | str] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, label = (piece.strip() for piece in item.partition("="))
        if not name or (sep and not label):
            raise ValueError(f"{item!r} is not NAME or NAME=LABEL; write e.g. nerve=1,vessel=2")
        if name in classes:
            raise ValueError(f"class {name!r} is named twice")
        label = label if sep else name
        classes[name] = int(label) if label.isdigit() else label
    return classes


class InputConfig(_Section):
    """Network input size; frames are resized to it and predictions resized back."""

    height: int = Field(448, ge=32, le=MAX_SIDE)
    width: int = Field(608, ge=32, le=MAX_SIDE)

    @field_validator("height", "width")
    @classmethod
    def _divisible_by_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"{value} is not divisible by 32 (the U-Net downsamples 5 times); use e.g. {value // 32 * 32 or 32}")
        return value


class ModelConfig(_Section):
    """The network: an smp architecture and encoder, one input channel, one output logit per pixel and structure.

    ``presence_head`` adds smp's classification head on the deepest encoder features (average pooling,
    ``presence_dropout``, one logit per structure): "is the structure in this frame at all". ``structures``
    is the number of output channels, one sigmoid each (multi-label: structures may overlap); training sets it
    from the data's structures.
    """

    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_weights: str = "auto"
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    presence_head: bool = True
    presence_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    structures: int = Field(1, ge=1, le=MAX_STRUCTURES)

    @field_validator("encoder_weights")
    @classmethod
    def _weights_text(cls, value: str) -> str:
        return check_path_text(value)


class ElasticConfig(_Section):
    """``ElasticTransform``: smoothed random displacement field (alpha pixels scale, sigma smoothing).

    Off by default (the recipe has p=0.25): on uns-mini it lowered the score (BENCHMARKS.md, "Accuracy").
    """

    p: float = Field(0.0, ge=0.0, le=1.0)
    alpha: float = Field(120.0, ge=0.0, le=MAX_ALPHA)
    sigma: float = Field(6.0, gt=0.0, le=MAX_SIGMA)


class BlurConfig(_Section):
    """``GaussianBlur`` with a random sigma in [sigma_min, sigma_max]."""

    p: float = Field(0.2, ge=0.0, le=1.0)
    sigma_min: float = Field(0.5, gt=0.0, le=MAX_SIGMA)
    sigma_max: float = Field(1.5, gt=0.0, le=MAX_SIGMA)

    @model_validator(mode="after")
    def _ordered(self) -> BlurConfig:
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} is above sigma_max={self.sigma_max}; swap them")
        return self


class FlipConfig(_Section):
    """``HorizontalFlip``."""

    p: float = Field(0.5, ge=0.0, le=1.0)


class BrightnessContrastConfig(_Section):
    """``RandomBrightnessContrast`` with symmetric limits."""

    p: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = Field(0.2, ge=0.0, le=1.0)
    contrast: float = Field(0.2, ge=0.0, le=1.0)


class DropoutConfig(_Section):
    """``CoarseDropout``: 1..max_holes rectangles of the image (not the mask) set to 0."""

    p: float = Field(0.3, ge=0.0, le=1.0)
    max_holes: int = Field(4, ge=1, le=MAX_HOLES)
    max_size: float = Field(0.1, gt=0.0, lt=1.0)


class AugmentConfig(_Section):
    """The recipe's training augmentations; validation and inference only resize.

    ``backend``: ``cpu`` augments each frame in DataLoader workers (Albumentations), ``gpu`` whole batches
    on the training device after the transfer (:mod:`medseg.data.gpu_augment`); ``auto`` is ``gpu`` on CUDA.
    """

    backend: Literal["auto", "cpu", "gpu"] = "auto"
    elastic: ElasticConfig = ElasticConfig()
    blur: BlurConfig = BlurConfig()
    hflip: FlipConfig = FlipConfig()
    brightness_contrast: BrightnessContrastConfig = BrightnessContrastConfig()
    coarse_dropout: DropoutConfig = DropoutConfig()


class LossConfig(_Section):
    """Training loss on logits; ``presence_weight`` weighs the BCE of the presence head (if the model has one),
    ``class_weights`` the structures of a model with several (one weight each; ``None``: equal)."""

    name: Literal["dice_bce", "tversky", "lovasz", "focal"] = "dice_bce"
    dice_weight: float = Field(0.5, ge=0.0)
    bce_weight: float = Field(0.5, ge=0.0)
    per_image_dice: bool = False
    tversky_alpha: float = Field(0.5, ge=0.0)
    tversky_beta: float = Field(0.5, ge=0.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    presence_weight: float = Field(0.5, ge=0.0)
    class_weights: list[float] | None = None

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(weight < 0 for weight in value) or sum(value) <= 0):
            raise ValueError("give one weight of 0 or more per structure, not all 0, e.g. [1, 2]")
        if value is not None and len(value) > MAX_STRUCTURES:
            raise ValueError(f"{len(value)} weights; a model has at most {MAX_STRUCTURES} structures")
        return value


class OptimConfig(_Section):
    """AdamW with a learning-rate schedule: ``plateau`` (ReduceLROnPlateau on the validation loss) or
    ``cosine`` (cosine decay over ``trainer.max_epochs`` down to ``lr * cosine_floor``)."""

    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["plateau", "cosine"] = "plateau"
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(5, ge=0, le=MAX_EPOCHS)
    cosine_floor: float = Field(0.01, ge=0.0, le=1.0)


class TrainerConfig(_Section):
    """The training loop; ``tune_after`` runs ``medseg tune`` on the run when training ends.

    ``devices`` is what Lightning takes: a number of devices (``-1``: all), a list of device indices, or ``auto`` (all
    of them on a GPU machine); one by default, as DDP trains a larger batch per step (``--devices N`` asks for it);
    ``strategy`` is a Lightning strategy name (checked against Lightning's registry before a run starts:
    :func:`medseg.learn.fit.check_trainer`). ``limit_*_batches`` is a number of batches, or a fraction of them in (0, 1].
    """

    max_epochs: int = Field(100, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    early_stopping_patience: int = Field(10, ge=1, le=MAX_EPOCHS)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    compile: bool = False
    gradient_clip: float | None = Field(None, gt=0.0)
    num_workers: int | None = Field(None, ge=0, le=MAX_WORKERS)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Literal["auto"] | int | list[int] = 1
    num_nodes: int = Field(1, ge=1, le=MAX_DEVICES)
    strategy: str = "auto"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    tune_after: bool = False
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        return parse_devices(value)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_name(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name = value.strip().lower()
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
            raise ValueError(f"{value!r} is not a Lightning strategy name; use auto, ddp, ddp_spawn, ...")
        return name

    @field_validator("limit_train_batches", "limit_val_batches", mode="before")
    @classmethod
    def _batch_limit(cls, value: Any) -> Any:
        whole = isinstance(value, int) and not isinstance(value, bool)
        if value is None or (whole and 1 <= value <= 2**31 - 1) or (isinstance(value, float) and 0.0 < value <= 1.0):
            return value
        raise ValueError("give a number of batches (1 or more), a fraction of them in (0, 1], or null for all")


def parse_devices(value: Any) -> Any:
    """``trainer.devices`` as Lightning takes it: ``auto``, a number (``-1``: every device) or a list of device indices.

    Text (``--devices 2``, ``--devices 0,1``) becomes the number or the list.

    Raises:
        ValueError: If it is none of those, or out of range.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"-?\d{1,9}", text):
            value = int(text)
        elif re.fullmatch(r"\d{1,9}(\s*,\s*\d{1,9})+", text):
            value = [int(part) for part in text.split(",")]
        elif text == "auto":
            return text
    if _is_count(value, -1, MAX_DEVICES) and value != 0:
        return value
    if isinstance(value, list) and value and all(_is_count(index, 0, MAX_DEVICES - 1) for index in value) and len(set(value)) == len(value):
        return value
    raise ValueError("give a number of devices (1 or more, -1 for all), a list of distinct device indices such as [0, 1], or auto")


def _is_count(value: Any, low: int, high: int) -> bool:
    """Whether ``value`` is a whole number (not a bool) from ``low`` to ``high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class SplitConfig(_Section):
    """Subject-grouped K-fold split; ``fold`` is the validation fold of a single run, ``null`` for a run
    that trains every fold (cross-validation and a fold ensemble, like ``--folds``)."""

    n_folds: int = Field(5, ge=2, le=MAX_FOLDS)
    fold: int | None = Field(0, ge=0, lt=MAX_FOLDS)
    seed: int = Field(0, ge=0, le=SEED_MAX)


class Config(_Section):
    """The whole run configuration."""

    data: DataOptions = DataOptions()
    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    split: SplitConfig = SplitConfig()

    @model_validator(mode="after")
    def _presence_head_is_trained(self) -> Config:
        if self.model.presence_head and self.loss.presence_weight == 0:
            raise ValueError(
                "model.presence_head=true with loss.presence_weight=0 would leave the head untrained; "
                "set loss.presence_weight above 0 or model.presence_head=false"
            )
        return self


_PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "default": {},
    "cpu": {  # chosen by bench/sweep_cpu.py (trial 14 of bench/sweeps/cpu-preset, two digits): BENCHMARKS.md
        "input": {"height": 128, "width": 128},
        "model": {"encoder": "resnet18"},
        "loss": {"dice_weight": 0.81, "bce_weight": 0.86, "presence_weight": 0.29},
        "optim": {"schedule": "cosine", "lr": 1.5e-3, "weight_decay": 1.2e-5},
        "augment": {
            "hflip": {"p": 0.13},
            "brightness_contrast": {"p": 0.41},
            "blur": {"p": 0.40},
            "coarse_dropout": {"p": 0.07},
            "elastic": {"p": 0.15},
        },
        "trainer": {"max_epochs": 30, "batch_size": 16, "early_stopping_patience": 30},
    },
    "kaggle": {
        "split": {"n_folds": 5, "fold": None},
        "trainer": {"tune_after": True},
    },
}


def load_config(
    preset: str = "default",
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Build a configuration from a preset, a YAML file, typed values and ``key=value`` overrides, in that order.

    Args:
        preset: ``default``, ``cpu`` or ``kaggle``.
        config_file: A YAML file with any subset of the keys.
        overrides: ``dotted.key=value`` strings; values are read as YAML.
        values: Already-typed values by dotted key (command-line shortcuts such as ``--mask-value``).

    Returns:
        The validated configuration.

    Raises:
        UsageError: On an unknown preset, an unreadable file, an unknown key or a wrong type; the
            message names the key and lists the valid ones.
    """
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    tree = Config().model_dump()
    _merge(tree, _PRESET_OVERRIDES[preset], "")
    if config_file is not None:
        content = _read_yaml(Path(config_file))
        try:
            _validate(_merge(tree, content, ""))
        except UsageError as error:
            raise UsageError(f"{config_file}: {error}") from None
    for key, value in (values or {}).items():
        _merge(tree, _nest(key, value), "")
    for text in overrides or []:
        key, value = _parse_override(text)
        _merge(tree, _nest(key, value), "")
    return _validate(tree)


def save_config(config: Config, path: Path) -> None:
    """Write the resolved configuration as YAML, atomically."""
    with atomic_write(path) as stream:
        yaml.safe_dump(config.model_dump(mode="json"), stream, sort_keys=False)


# Keys added after runs were first saved, with the value that reproduces a run folder that lacks them.
_ABSENT_IN_OLDER_RUNS: dict[str, Any] = {"model": {"presence_head": False}}


def read_run_config(path: Path) -> Config:
    """Read a configuration a run saved; keys it lacks (written by an older medseg) take the value that
    reproduces that run, not today's default.

    Raises:
        UsageError: If the file is missing or invalid.
    """
    tree = _merge(Config().model_dump(), _ABSENT_IN_OLDER_RUNS, "")
    content = _read_yaml(Path(path))
    try:
        tree = _merge(tree, content, "")
        if not isinstance(content.get("data"), dict) or "rle_format" not in content["data"]:  # saved before RLE dialects
            tree["data"]["rle_format"] = "row-major" if tree["data"]["rle_order"] == "C" else "kaggle"
        return _validate(tree)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = read_yaml(path, path, "configuration")
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UsageError(f"{path}: a config file is a mapping of sections (data:, model:, trainer:, ...)")
    return content


def _parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` of ``--set``: the value read as YAML, or as the text itself where it is not plain YAML (invalid,
    with anchors or aliases, or nested too deeply), so that e.g. a regular expression needs no quotes."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set {text!r}: write key=value, e.g. --set trainer.max_epochs=2")
    if not raw.strip():
        return key, None
    try:
        return key, parse_yaml(raw, f"--set {key}")
    except UsageError:
        return key, raw


def _nest(key: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


_SCHEMA = Config().model_dump()


def _merge(tree: dict[str, Any], update: dict[str, Any], prefix: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``update`` into ``tree`` in place, refusing keys the configuration does not have.

    What is a section and what is a value comes from the schema (the defaults), not from earlier merges.
    """
    schema = _SCHEMA if schema is None else schema
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in schema:
            valid = ", ".join(f"{prefix}{name}" for name in schema)
            raise UsageError(f"unknown config key {path!r}; valid keys here: {valid}")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise UsageError(f"config key {path!r} is a section; set one of its keys, e.g. {path}.{next(iter(schema[key]))}=...")
            _merge(tree[key], value, f"{path}.", schema[key])
        else:
            tree[key] = value
    return tree


def _validate(tree: dict[str, Any]) -> Config:
    """The configuration of a merged tree; every problem pydantic finds is in the one error line."""
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise UsageError("; ".join(_problem(item) for item in error.errors())) from None


def _problem(item: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in item["loc"] if not _is_type_tag(part))
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "value_error" and isinstance(item.get("input"), dict):
        return f"config key {key!r}: {message}" if key else message
    return f"config key {key!r}: {message} (got {shown(item.get('input'))})"


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "tuple", "none"}


def _is_type_tag(part: object) -> bool:
    """Whether a part of pydantic's error location names a member of a union (``int``, ``tuple[float, float]``), not a key."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)
