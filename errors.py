"""The mistakes a user fixes, each printed as one line by every command (exit code 2)."""
from __future__ import annotations

import errno
import os
import shutil


class UserError(Exception):
    """A problem the user fixes; its message names the thing, the value and the fix."""


class ConfigError(UserError):
    """A flag, a device, a path or a disk."""


class DataError(UserError):
    """A record or one of its files (audio, codes): the file, the record, the field and the fix."""


def need_file(path: str, what: str, fix: str, error=DataError) -> str:
    """`path` if it is a readable file, else an `error` saying what is wrong with it, and `fix`."""
    if os.path.isfile(path) and os.access(path, os.R_OK):
        return path
    problem = ("is not readable (permission denied)" if os.path.isfile(path) else
               "is a folder, not a file" if os.path.isdir(path) else "not found")
    raise error(f"{what} {path} {problem}; {fix}")


def io_error(e: Exception, path: str, doing: str) -> ConfigError:
    """An OSError (or torch.save's RuntimeError on a full disk) as one line naming the path."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or (code is None and "unexpected pos" in str(e)):
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free / 2 ** 20
        return ConfigError(f"{doing} {path}: no space left on the device ({free:.0f} MiB free); "
                           "free some space or use another --output_dir, then --resume")
    if code == errno.EROFS:
        return ConfigError(f"{doing} {path}: read-only file system; choose an --output_dir on a "
                           "writable disk")
    if code in (errno.EACCES, errno.EPERM):
        return ConfigError(f"{doing} {path}: permission denied; choose an --output_dir you can write")
    return ConfigError(f"{doing} {path}: {e}")
