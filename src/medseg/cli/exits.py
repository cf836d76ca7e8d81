"""The command line's exit codes and the one line a failed read or write becomes.

Exit codes: 0 success, 1 problems found or a data error, 2 a usage error (130 when interrupted).
"""

from __future__ import annotations

import errno

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def os_error_line(error: OSError) -> str:
    """One line for a failed read or write (a full disk, a missing permission), with the fix."""
    where = f"{error.filename}: " if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}disk full ({error.strerror}); free space or write elsewhere, then run again (with --resume for train); "
            "files written before are intact"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{error.strerror}; check the folder's permissions or write elsewhere"
    return f"{where}{error.strerror or error}"
