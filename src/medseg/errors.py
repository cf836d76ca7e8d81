"""The errors medseg raises for problems a user can fix.

The command line turns every :class:`MedsegError` into one line on stderr and a non-zero exit; anything
else is a bug in medseg and keeps its traceback.
"""

from os import PathLike
from pathlib import Path


class MedsegError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class UsageError(MedsegError):
    """A command called with arguments that cannot work: a missing path, an unknown option value."""


class DataError(MedsegError):
    """A data set that cannot be used as it is: wrong layout, missing columns, contradicting sources."""


class FileError(DataError):
    """A problem tied to one file of a data set.

    Attributes:
        path: The file (or, for a frame posted to ``medseg serve``, its bytes in memory, shown by their name).
        reason: What is wrong with it and how to fix it, without the file name.
        kind: Short machine-readable name of the problem, as the inspector reports it.
    """

    kind = "bad_file"

    def __init__(self, path: Path | object, reason: str, kind: str | None = None) -> None:
        self.path = Path(path) if isinstance(path, str | PathLike) else path  # else bytes in memory (data.io.FrameBytes)
        self.reason = reason
        if kind is not None:
            self.kind = kind
        super().__init__(f"{path}: {reason}")


class ImageReadError(FileError):
    """An image or mask file that cannot be read: missing, empty, truncated, corrupt or unsupported."""

    kind = "unreadable_image"


class UnsupportedFormatError(ImageReadError):
    """A file whose content is none of the image formats medseg reads (told apart by ``medseg serve``: HTTP 415)."""
