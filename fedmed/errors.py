"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class FedmedError(Exception):
    """A problem with the user's input (config, paths, data), not a bug in fedmed."""


def os_error_line(exc: OSError) -> str:
    """A file-system error as the one line the CLI prints: what could not be read or
    written, and, for a full disk or an exhausted quota, what to do about it."""
    import errno

    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device{where}: free space and run again"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}: free space (or raise the quota) and run again"
    if exc.errno is None and str(exc).endswith(" written"):  # numpy's short write ("N requested and M written")
        return f"a write was cut short ({exc}){where}: is the disk full? free space and run again"
    return f"{exc.strerror}{where}" if exc.strerror else str(exc)
