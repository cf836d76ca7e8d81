"""The errors medseg raises for problems a user can fix.

The command line turns every :class:`MedsegError` into one line on stderr and a non-zero exit; anything
else is a bug in medseg and keeps its traceback.
"""


class MedsegError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ImageReadError(MedsegError):
    """An image or mask file that cannot be read: missing, empty, truncated, corrupt or unsupported."""


class DataError(MedsegError):
    """A data set that cannot be used as it is: wrong layout, missing columns, contradicting sources."""


class UsageError(MedsegError):
    """A command called with arguments that cannot work: a missing path, an unknown option value."""
