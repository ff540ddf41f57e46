"""What is wrong with a local path, in one line: a regular file where a folder belongs, a
folder where a file belongs, a permission this process's user lacks (naming the UID and the
owner: what a container's user needs to fix a mounted folder), a full or read-only disk.

Pure functions over ``os``/``pathlib``; :mod:`stablerep.storage` turns them into its errors.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# errno values of an OSError that a wrong local path (not a bug) causes
_PATH_ERRNOS = {errno.ENOTDIR: "", errno.EEXIST: "", errno.EISDIR: "",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.ENOSPC: "no space left on the device",
                errno.EROFS: "the file system is read-only",
                errno.ENAMETOOLONG: "the name is too long",
                errno.ELOOP: "too many levels of symbolic links"}


def blocking_file(path: Path) -> Path | None:
    """The first component of ``path`` that exists and is not a folder, if any."""
    for part in reversed([path, *path.parents]):
        if part.exists() and not part.is_dir():
            return part
    return None


def describe_path_error(exc: BaseException, *, path: str | os.PathLike | None = None
                        ) -> str | None:
    """One line saying what is wrong with the local path behind ``exc``, or None.

    Covers the errors a user's path causes: a path that is a regular file or runs through
    one, a folder where a file is expected, missing permissions, a full or read-only disk.

    Args:
        exc: any exception; only an ``OSError`` with a file name is described.
        path: the path to name instead of the one in ``exc`` (e.g. a relative one).
    """
    if not isinstance(exc, OSError) or exc.errno not in _PATH_ERRNOS or not exc.filename:
        return None
    where = Path(path) if path is not None else Path(os.fsdecode(exc.filename))
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = blocking_file(where)
        if blocker is not None:
            return f"{blocker} is a regular file, expected a folder"
        return f"{where}: {exc.strerror or 'already exists'}"
    if exc.errno == errno.EISDIR:
        return f"{where} is a folder, expected a file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied {who_and_owner(where)}"
    return f"{where}: {_PATH_ERRNOS[exc.errno]}"


def who_and_owner(path: Path) -> str:
    """'to UID u (owner UID o, mode m)' of the nearest existing part of ``path``: what a
    container's user needs to know to fix a mounted folder it cannot write."""
    owner = ""
    for part in (path, *path.parents):
        try:
            st = part.stat()
        except OSError:
            continue
        owner = f"; {part} is owned by UID {st.st_uid}, mode {st.st_mode & 0o7777:o}"
        break
    return f"to UID {os.getuid()}{owner}"
