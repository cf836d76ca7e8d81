"""Files medseg writes and reads: atomic writes, names that stay inside their folder, bounded reads.

Every input may be hostile (a data folder or a run folder someone hands you). Three rules live here:

- A name that becomes part of a path (a structure, a frame id, a fold) follows :data:`NAME_RULE`, checked
  where it enters medseg (:func:`check_name`), and writers join it with :func:`inside`, which refuses a
  result outside the folder in any case.
- An output is created atomically (:func:`atomic_write`): a crash or a full disk leaves the old file or
  none; with ``exclusive`` a file that appeared meanwhile (another process) is never replaced.
- A text file read from a user or a run folder is bounded in size before it is parsed (:func:`read_bounded`),
  and YAML may hold no anchors or aliases (:func:`parse_yaml`: a few hundred bytes of nested aliases expand to
  gigabytes, and no file medseg reads needs them).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from medseg.errors import MedsegError, UsageError

NAME_RULE = "letters, digits and -_. only, at most 128 characters, not . or .., no leading -"
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.\-]{0,127}")
MAX_TEXT_BYTES = 64 * 1024 * 1024  # a run file, a configuration or a search space is a few KB; 64 MB is refused


class OutputExistsError(UsageError):
    """An output that exists (or appeared while medseg was writing it) and may not be replaced."""


def is_safe_name(name: object) -> bool:
    """Whether ``name`` may become a file or folder name (:data:`NAME_RULE`)."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and name not in (".", "..")


def check_name(name: object, what: str, where: object) -> str:
    """Return ``name`` when it may become part of a path, else refuse it in one line.

    Args:
        name: The name, as it came from the user's data or a run file.
        what: What it names (``class``, ``frame id``, ...), for the message.
        where: The file or option it came from, for the message.

    Raises:
        UsageError: If it breaks :data:`NAME_RULE`.
    """
    if not is_safe_name(name):
        raise UsageError(f"{where}: {what} {shown(name)} cannot become a file name ({NAME_RULE}); rename it")
    return name


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (its type's name when it has none), cut to ``limit`` characters."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters: a hostile name or a huge number in a message."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python prints
        return "a number too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inside(folder: Path, *names: str) -> Path:
    """``folder / name / ...``, refused when the result would leave ``folder`` (``..``, an absolute name, a link).

    Raises:
        MedsegError: If the joined path resolves outside ``folder``.
    """
    folder = Path(folder)
    path = folder.joinpath(*names)
    base = folder.resolve()
    if any(Path(name).is_absolute() for name in names) or not path.resolve().is_relative_to(base) or path.resolve() == base:
        raise MedsegError(f"{folder}: refused to write {'/'.join(names)!r}: it would land outside the folder")
    return path


def printable(text: object) -> str:
    """``text`` as it can be printed and written as UTF-8: a file name that is not UTF-8 keeps its bytes as ``\\udcXX``."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def safe_file_name(text: str) -> str:
    """A file name made of ``text`` (a frame id in a figure's name): characters outside :data:`NAME_RULE` become ``_``."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", text)[:128].lstrip("-") or "_"
    return "_" if name in (".", "..") else name


@dataclass(frozen=True)
class Output:
    """One output of a command, for :func:`check_outputs`.

    Attributes:
        option: The option that names it (``--out``), for the messages.
        path: Where it is written.
        folder: Whether it is a folder (else a file).
    """

    option: str
    path: Path
    folder: bool = False


def check_outputs(outputs: Iterable[Output], force: bool, inputs: Iterable[Path] = ()) -> None:
    """Check every output of a command before its first byte is written.

    Two outputs may not name the same place (nor a file lie inside an output folder, which is replaced
    whole), an output may not be or hold one of the command's inputs, a file may not be a folder or the
    other way round, and an existing output is replaced only with ``force``.

    Raises:
        UsageError: Naming the option, the path and the fix.
    """
    outputs = list(outputs)
    for output in outputs:
        _check_kind(output)
        _check_not_input(output, inputs)
    for index, first in enumerate(outputs):
        for second in outputs[index + 1 :]:
            _check_apart(first, second)
    for output in outputs:
        if output.path.exists() and not force and not (output.folder and not any(output.path.iterdir())):
            raise OutputExistsError(f"{output.option} {output.path}: exists; use --force to replace it or choose another name")


def _check_kind(output: Output) -> None:
    path = output.path
    if output.folder and path.exists() and not path.is_dir():
        raise UsageError(f"{output.option} {path}: exists and is not a folder; give a folder name")
    if not output.folder and path.is_dir():
        raise UsageError(f"{output.option} {path}: is a folder; give a file name")
    if path.is_symlink():
        raise UsageError(f"{output.option} {path}: is a link; medseg writes only to a plain path, give another name")


def _check_not_input(output: Output, inputs: Iterable[Path]) -> None:
    where = output.path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if where == source or (output.folder and source.is_relative_to(where)):
            raise UsageError(f"{output.option} {output.path}: is (or holds) the input {source}; write the output elsewhere")


def _check_apart(first: Output, second: Output) -> None:
    a, b = first.path.resolve(), second.path.resolve()
    if a == b:
        raise UsageError(f"{first.option} and {second.option} both name {first.path}; give each its own path")
    for outer, inner, outer_path in ((first, second, a), (second, first, b)):
        if outer.folder and (b if outer is first else a).is_relative_to(outer_path):
            raise UsageError(
                f"{inner.option} {inner.path} lies inside {outer.option} {outer.path}, which is replaced whole; write it elsewhere"
            )


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A CSV cell as spreadsheet tools expect it to be neutralised: text that starts like a formula gets a ``'``.

    Numbers are kept as they are; only text (a frame id, a name from the data) can carry a formula.
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


@contextmanager
def atomic_write(path: Path, mode: str = "w", exclusive: bool = False) -> Iterator:
    """Open a temporary file beside ``path`` and move it into place only when the block succeeds.

    A crash or full disk leaves either the old file or no file, never a partial one.

    Args:
        path: Final location.
        mode: ``"w"`` for text, ``"wb"`` for bytes.
        exclusive: Create ``path`` only if it does not exist when the block ends (a hard link, which the
            file system makes atomically): of two processes writing the same new file one succeeds.

    Yields:
        The open temporary file.

    Raises:
        OutputExistsError: With ``exclusive``, if ``path`` exists by the time the file is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(handle, mode, encoding=None if "b" in mode else "utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        if exclusive:
            _link_new(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _link_new(temporary: str, path: Path) -> None:
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise OutputExistsError(f"{path}: appeared while medseg was writing it (another process?); nothing was replaced") from None
    except OSError:  # a file system without hard links: the next best, a check just before the rename
        if path.exists():
            raise OutputExistsError(f"{path}: appeared while medseg was writing it (another process?); nothing was replaced") from None
        os.replace(temporary, path)


def read_bounded(path: Path, limit: int = MAX_TEXT_BYTES, what: str = "file") -> str:
    """A UTF-8 text file's content, refused before reading when it is larger than ``limit`` bytes.

    Raises:
        FileNotFoundError: If it is missing (the caller words that).
        UsageError: If it is too large or not UTF-8 text.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise UsageError(f"{path}: {size:,} bytes, more than a {what} can be ({limit:,}); is it the right file?")
    with open(path, "rb") as handle:
        content = handle.read(limit + 1)
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


CONFIG_BYTES = 64 * 1024  # a configuration is about 3 KB, a search space less; PyYAML reads 64 KB in a fraction of a second
MAX_YAML_DEPTH = 64  # nested [ ] and { } of a YAML text (a configuration nests 3): PyYAML's scanner takes time quadratic in it
# What PyYAML's constructors let through for a scalar they cannot make: a 5,000-digit number or a 13th month
# (ValueError), an empty ``!!int`` (IndexError), ``!!bool maybe`` (KeyError), ``!!timestamp soon`` (AttributeError).
_CONSTRUCTOR_ERRORS = (ValueError, IndexError, KeyError, AttributeError, TypeError, OverflowError)


def read_yaml(path: Path, where: object, what: str, limit: int = CONFIG_BYTES) -> object:
    """The content of a YAML file from a user or a run folder: bounded in size, parsed by :func:`parse_yaml`.

    Args:
        path: The file.
        where: How messages name it (the path, or ``--space FILE``).
        what: What it is (``configuration``, ``search space``), for messages.
        limit: The most bytes it may hold.

    Raises:
        FileNotFoundError: If it is missing (the caller words that).
        UsageError: If it is too large, unreadable, not UTF-8, or :func:`parse_yaml` refuses it.
    """
    try:
        text = read_bounded(Path(path), limit, what)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise UsageError(f"{where}: cannot read the {what} ({error.strerror or error})") from None
    return parse_yaml(text, where)


def parse_yaml(text: str, where: object) -> object:
    """The content of a YAML text, read in one pass and refused in one line when it could hang or crash the reader.

    Refused: an anchor or an alias (``&a``, ``*a``: a few hundred bytes of them expand to gigabytes), nesting
    deeper than :data:`MAX_YAML_DEPTH` (stopped as the scanner reaches it: PyYAML's scanner is quadratic in it),
    invalid YAML, and a value Python cannot make (a 5,000-digit number, a 13th month).

    Raises:
        UsageError: Naming ``where``, the line where known, and the fix.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except _Refused as refused:
        what, line = refused.args
        raise UsageError(f"{where}: {what} (line {line}); " + _REFUSED_FIX[what]) from None
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply to be a medseg file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{where}: not valid YAML{line}; fix the file") from None
    except _CONSTRUCTOR_ERRORS as error:
        reason = (str(error).splitlines() or [""])[0][:120] or type(error).__name__
        raise UsageError(f"{where}: a value cannot be read ({reason}); fix the file") from None


_ALIASES = "YAML anchors and aliases (&, *) are not accepted"
_TOO_DEEP = f"nested deeper than {MAX_YAML_DEPTH} levels"
_REFUSED_FIX = {_ALIASES: "write the values out", _TOO_DEEP: "a medseg file nests a few"}


class _Refused(Exception):
    """What :class:`_BoundedLoader` refuses, and the line where it met it."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops at an anchor or alias and at the :data:`MAX_YAML_DEPTH`-th nested ``[`` or ``{``."""

    def fetch_flow_collection_start(self, token_class: type) -> None:
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _Refused(_TOO_DEEP, self.get_mark().line + 1)
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: object, index: object) -> object:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(_ALIASES, event.start_mark.line + 1)
        return super().compose_node(parent, index)
