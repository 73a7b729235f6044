"""Write a directory so that readers see the old one or the new one, never a mix.

The new content is built in a staging directory beside the target, named
`.<target>.partial-XXXXXXXX` and locked (`flock`) by its writer for as long as it exists.
It is swapped into place with one `renameat2(RENAME_EXCHANGE)` where the kernel and file
system offer it; elsewhere with two renames, between which the target is briefly absent
(the old content is then in a locked staging directory). A writer killed at any moment
leaves the target as it was (or absent, in the two-rename window) plus a staging directory
whose lock died with it; the next writer of the same target removes those, and only those:
a name of the staging pattern whose lock it can take.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_MARK = ".partial-"
_SUFFIX = re.compile(r"[0-9a-f]{8}")
_ATTEMPTS = 5


def staging_name_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{target.name}{STAGING_MARK}") + _SUFFIX.pattern)


def _lock(path: Path) -> int | None:
    """A descriptor holding an exclusive lock on directory `path`, or None if another
    process holds it (or the directory vanished)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging directories of `target` whose writer is gone; return them."""
    pattern, removed = staging_name_pattern(target), []
    for path in target.parent.iterdir() if target.parent.is_dir() else ():
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        fd = _lock(path)
        if fd is None:  # its writer is alive
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh locked staging directory for `target`; the caller fills it and calls
    `replace_with(staging, target)`. Removed on any failure, and the stale staging
    directories of earlier killed writers are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    for _ in range(_ATTEMPTS):
        staging = target.with_name(f".{target.name}{STAGING_MARK}{secrets.token_hex(4)}")
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        fd = _lock(staging)  # None if a concurrent writer's clean-up took it first
        if fd is not None:
            break
    else:
        raise OSError(errno.EBUSY, "could not create and lock a staging directory", str(target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a crash after the swap cannot
    expose files whose data never reached the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder), directory=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where renameat2(RENAME_EXCHANGE) is unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_with(staging: Path, target: Path) -> None:
    """Put the complete `staging` directory at `target`, retiring what was there."""
    _sync_tree(staging)
    if not target.exists():
        staging.rename(target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old content
    else:
        fd = _lock(target)  # the old content stays locked under its retired name
        retired = target.with_name(f".{target.name}{STAGING_MARK}{secrets.token_hex(4)}")
        try:
            target.rename(retired)
            try:
                staging.rename(target)
            except BaseException:
                retired.rename(target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
    _fsync(target.parent, directory=True)
