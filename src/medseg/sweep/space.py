"""The search space of a sweep: which configuration keys each trial draws, and from what.

A space file is YAML, one entry per dotted configuration key (the keys of ``--set``)::

    optim.lr: {low: 1.0e-4, high: 3.0e-3, log: true}     # a number between low and high (log: on a log scale)
    trainer.max_epochs: {low: 10, high: 40, step: 5}      # whole numbers when low and high are (step: their spacing)
    model.encoder: {choices: [resnet18, resnet34]}        # one of a list of plain values
    input: {choices: [{height: 128, width: 160}, {height: 256, width: 352}]}   # keys of a section that go together

A choice may be a value the configuration refuses (the trial that draws it fails, with the reason, and the sweep
goes on); a key the configuration does not have is refused when the file is read. ``data`` keys are not searched:
the data are the study's. :data:`DEFAULT_SPACE` is the space of a sweep without ``--space``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from medseg.config import Config
from medseg.errors import UsageError
from medseg.files import read_yaml, shown

DEFAULT_SPACE = """\
# medseg sweep's default search space (copy it, edit it, and pass it with --space FILE)
optim.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
optim.weight_decay: {low: 1.0e-6, high: 1.0e-2, log: true}
trainer.max_epochs: {low: 15, high: 40, step: 5}
loss.dice_weight: {low: 0.2, high: 1.0}
loss.bce_weight: {low: 0.2, high: 1.0}
loss.presence_weight: {low: 0.1, high: 1.0}
augment.hflip.p: {low: 0.0, high: 0.5}
augment.brightness_contrast.p: {low: 0.0, high: 0.8}
augment.blur.p: {low: 0.0, high: 0.5}
augment.coarse_dropout.p: {low: 0.0, high: 0.5}
augment.elastic.p: {low: 0.0, high: 0.3}
model.encoder: {choices: [resnet18, resnet34, efficientnet-b0]}
input: {choices: [{height: 128, width: 160}, {height: 256, width: 352}, {height: 448, width: 608}]}
"""
RANGE_FIELDS = {"low", "high", "log", "step"}
MAX_WHOLE = 2**53  # whole numbers of a range stay below it: Optuna computes with floats, exact up to 2**53
SCALARS = (str, int, float, bool, type(None))
_TREE = Config().model_dump()


@dataclass(frozen=True)
class Param:
    """One searched entry of a space.

    Attributes:
        key: The dotted configuration key (a section's, for choices of mappings); Optuna's parameter name.
        kind: ``float``, ``int`` or ``choice``.
        low: Lowest value of a range.
        high: Highest value of a range.
        log: Whether a range is drawn on a log scale.
        step: Spacing of a range's values (``None``: any float; 1 for whole numbers).
        choices: The values of a list, as Optuna stores them (a mapping's label, e.g. ``height=128,width=160``).
        expansions: For choices of mappings, each label's configuration values by dotted key.
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    expansions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter's value for a trial, with Optuna's ``suggest_*``."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_categorical(self.key, self.choices)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution ``suggest`` draws from (what a study records for this parameter)."""
        if self.kind == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.CategoricalDistribution(self.choices)

    def clash_with(self, recorded: optuna.distributions.BaseDistribution) -> str | None:
        """Why a study that recorded ``recorded`` for this parameter cannot draw it from this entry, else ``None``.

        Optuna decides (:func:`optuna.distributions.check_distribution_compatibility`: a range may widen or narrow
        within a study, another kind of value, another scale or other choices may not); this only words its refusal.
        """
        mine = self.distribution()
        try:
            optuna.distributions.check_distribution_compatibility(recorded, mine)
        except ValueError:
            pass
        else:
            return None
        if type(mine) is not type(recorded):
            return f"{self.key} is {_kind_words(mine)} here but {_kind_words(recorded)} in the study"
        if isinstance(mine, optuna.distributions.CategoricalDistribution):
            return f"{self.key} chooses among {list(mine.choices)} here but {list(recorded.choices)} in the study"
        return f"{self.key} is drawn on a {_scale(mine)} scale here but a {_scale(recorded)} one in the study"

    def values(self, drawn: Any) -> dict[str, Any]:
        """The configuration values, by dotted key, of a drawn value."""
        return dict(self.expansions[drawn]) if self.expansions else {self.key: drawn}

    def drawn_for(self, flat: dict[str, Any]) -> Any | None:
        """The value of this parameter that gives a configuration's own values, or ``None`` where none does (out of range).

        Used to enqueue a configuration (a preset) as a trial, so that a study has it as its baseline.

        Args:
            flat: The configuration's values by dotted key.
        """
        if self.expansions:
            matching = (label for label, values in self.expansions.items() if all(flat.get(key) == value for key, value in values.items()))
            return next(matching, None)
        value = flat.get(self.key)
        if self.kind == "choice":
            return value if value in self.choices else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            return None
        return value

    def config_keys(self) -> list[str]:
        """Every dotted configuration key this parameter sets."""
        return sorted({key for values in self.expansions.values() for key in values}) if self.expansions else [self.key]

    def describe(self) -> str:
        """The range or the list, in words."""
        if self.kind == "choice":
            return "one of " + ", ".join(str(choice) for choice in self.choices)
        scale = ", log scale" if self.log else ""
        step = f", step {self.step:g}" if self.step is not None and not (self.kind == "int" and self.step == 1) else ""
        return f"{self.low:g} to {self.high:g}{step}{scale}"


@dataclass(frozen=True)
class Space:
    """The parameters of a sweep.

    Attributes:
        params: One per entry, in the file's order.
        source: Where it came from (the file, or ``default``), for messages.
    """

    params: tuple[Param, ...]
    source: str

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """A trial's configuration values by dotted key, each parameter drawn with Optuna."""
        values: dict[str, Any] = {}
        for param in self.params:
            values.update(param.values(param.suggest(trial)))
        return values

    def drawn_for(self, config: Config) -> dict[str, Any]:
        """The parameter values that give ``config``'s own values (Optuna's ``enqueue_trial`` takes them); a parameter
        that cannot give its value is left out, so that the enqueued trial draws it."""
        flat = _flatten(config.model_dump(mode="json"), "")
        drawn = {param.key: param.drawn_for(flat) for param in self.params}
        return {key: value for key, value in drawn.items() if value is not None}

    def clashes_with_study(self, study: optuna.Study) -> list[str]:
        """Why the study's trials so far cannot go on with this space, one reason per parameter (empty: they can)."""
        recorded: dict[str, optuna.distributions.BaseDistribution] = {}
        for trial in study.get_trials(deepcopy=False):
            recorded.update(trial.distributions)
        reasons = (param.clash_with(recorded[param.key]) for param in self.params if param.key in recorded)
        return [reason for reason in reasons if reason is not None]

    def config_keys(self) -> list[str]:
        """Every dotted configuration key the space sets."""
        return [key for param in self.params for key in param.config_keys()]

    def clashes(self, keys: Iterable[str]) -> list[tuple[str, str]]:
        """The pairs (key of the space, given key) that set the same configuration value (or one inside the other)."""
        return [(mine, given) for mine in self.config_keys() for given in keys if _overlap(mine, given)]


def _kind_words(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return "a list of choices"
    return "a range of whole numbers" if isinstance(distribution, optuna.distributions.IntDistribution) else "a range of numbers"


def _scale(distribution: optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution) -> str:
    return "log" if distribution.log else "linear"


def load_space(path: Path | None) -> Space:
    """The space of a file, or :data:`DEFAULT_SPACE` for ``None``.

    The file is read as any YAML medseg reads (:func:`medseg.files.read_yaml`): bounded in size, without anchors
    or aliases.

    Raises:
        UsageError: If the file cannot be read, is not a mapping of entries, or an entry is malformed or names a
            key the configuration does not have; the message starts with ``--space FILE``.
    """
    if path is None:
        return parse_space(yaml.safe_load(DEFAULT_SPACE), "default")
    where = f"--space {path}"
    try:
        content = read_yaml(Path(path), where, "search space")
    except FileNotFoundError:
        raise UsageError(f"{where}: file not found; give a YAML file of `key: {{low: ..., high: ...}}` entries") from None
    return parse_space(content, where)


def parse_space(content: Any, where: str) -> Space:
    """The space of a parsed YAML document.

    Raises:
        UsageError: As :func:`load_space`, naming ``where``.
    """
    if not isinstance(content, dict) or not content:
        raise UsageError(
            f"{where}: a space is a mapping of config keys to {{low, high}} or {{choices: [...]}}, "
            "e.g. optim.lr: {low: 1.0e-4, high: 1.0e-2}"
        )
    return Space(tuple(_param(str(key), entry, where) for key, entry in content.items()), where)


def _param(key: str, entry: Any, where: str) -> Param:
    node = _config_node(key, where)
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: {key}: give {{low: L, high: H}} or {{choices: [...]}}, not {shown(entry)}")
    if "choices" in entry:
        if set(entry) != {"choices"}:
            raise UsageError(f"{where}: {key}: choices go alone; drop {', '.join(sorted(set(entry) - {'choices'}))}")
        return _choices(key, entry["choices"], isinstance(node, dict), where)
    if isinstance(node, dict):
        raise UsageError(f"{where}: {key} is a section; search one of its keys (e.g. {key}.{next(iter(node))}) or give choices of mappings")
    return _range(key, entry, where)


def _config_node(key: str, where: str) -> Any:
    """The configuration's default at a dotted key (a dict for a section).

    Raises:
        UsageError: If the key is not in the configuration, or is a data key.
    """
    if key == "data" or key.startswith("data."):
        raise UsageError(
            f"{where}: {key}: data keys are not searched (a study's data stay the same); give them with --set or the data flags"
        )
    node: Any = _TREE
    done: list[str] = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            prefix = ".".join(done)
            valid = ", ".join(f"{prefix}.{name}" if prefix else name for name in node) if isinstance(node, dict) else ""
            raise UsageError(f"{where}: unknown config key {key!r}; valid keys here: {valid}")
        node = node[part]
        done.append(part)
    return node


def _range(key: str, entry: dict, where: str) -> Param:
    unknown = set(entry) - RANGE_FIELDS
    if unknown:
        raise UsageError(f"{where}: {key}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; a range is {{low, high, log, step}}")
    if "low" not in entry or "high" not in entry:
        raise UsageError(f"{where}: {key}: a range needs low and high, e.g. {{low: 0.0, high: 0.5}}")
    low, high = _number(entry["low"], key, "low", where), _number(entry["high"], key, "high", where)
    step = None if entry.get("step") is None else _number(entry["step"], key, "step", where)
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise UsageError(f"{where}: {key}: log is true or false, not {shown(log)}")
    if not low < high:
        raise UsageError(f"{where}: {key}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise UsageError(f"{where}: {key}: a log scale needs low above 0 (got {low:g})")
    if step is not None and (step <= 0 or log):
        raise UsageError(f"{where}: {key}: step must be above 0 and goes without log")
    whole = all(isinstance(value, int) for value in (low, high)) and (step is None or isinstance(step, int))
    return Param(key, "int" if whole else "float", low if whole else float(low), high if whole else float(high), log, step)


def _number(value: Any, key: str, name: str, where: str) -> int | float:
    """A range's number, finite (whole numbers below :data:`MAX_WHOLE`); YAML reads ``1e-4`` (without a dot) as
    text, so numeric text is a number too."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: {key}: {name} must be a number, not {shown(value)}")
    if not _finite(value):
        raise UsageError(f"{where}: {key}: {name} must be a finite number below {MAX_WHOLE:.0e} in size, not {shown(value)}")
    return value


def _finite(value: Any) -> bool:
    """Whether a number is finite and, when whole, within :data:`MAX_WHOLE`; anything else counts as finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, int) or abs(value) <= MAX_WHOLE


def _choices(key: str, choices: Any, section: bool, where: str) -> Param:
    if not isinstance(choices, list) or not choices:
        raise UsageError(f"{where}: {key}: choices is a non-empty list, e.g. {{choices: [a, b]}}")
    if section:
        expansions = {}
        for choice in choices:
            values = _section_choice(key, choice, where)
            expansions[",".join(f"{name.removeprefix(key + '.')}={value}" for name, value in values.items())] = values
        if len(expansions) < len(choices):
            raise UsageError(f"{where}: {key}: a choice is listed twice; list each once")
        return Param(key, "choice", choices=tuple(expansions), expansions=expansions)
    for choice in choices:
        if not isinstance(choice, SCALARS) or not _finite(choice):
            raise UsageError(f"{where}: {key}: choices are plain values (finite numbers, text, true/false, null), not {shown(choice)}")
    if len(set(map(repr, choices))) < len(choices):
        raise UsageError(f"{where}: {key}: a choice is listed twice; list each once")
    return Param(key, "choice", choices=tuple(choices))


def _section_choice(key: str, choice: Any, where: str) -> dict[str, Any]:
    """A mapping choice of a section, as configuration values by full dotted key, every key checked."""
    if not isinstance(choice, dict) or not choice:
        raise UsageError(
            f"{where}: {key} is a section: each choice is a mapping of its keys, e.g. {{choices: [{{height: 128, width: 160}}]}}"
        )
    values = {}
    for name, value in _flatten(choice, f"{key}.").items():
        if isinstance(_config_node(name, where), dict) or not isinstance(value, SCALARS) or not _finite(value):
            raise UsageError(
                f"{where}: {name}: a choice gives plain values (finite numbers, text, ...) to keys of the section, not {shown(value)}"
            )
        values[name] = value
    return values


def _flatten(tree: dict, prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _overlap(first: str, second: str) -> bool:
    return first == second or first.startswith(second + ".") or second.startswith(first + ".")
