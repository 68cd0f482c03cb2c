"""Writers of a bundle take turns: an advisory lock beside the bundle, and the debris of dead writers removed.

Every write into a bundle (``write_policy``, ``write_profile``, ``write_bundle``'s replace) happens under
``bundle_lock``: ``PARENT/.NAME.lock``, an ``flock`` held for the few milliseconds of the write, with the owner's
pid and purpose written into it for the error message. The kernel drops the lock when its process dies, so a
killed writer never leaves the bundle locked. The lock lives beside the bundle, not in it, so it survives the
bundle's directory being replaced and never travels with a flash.

Temporary names carry their writer's pid (``.NAME.tmp-<pid>-*``, ``edgequee-convert-<pid>-*``), so a later
writer can tell the debris of a dead process from the work in progress of a live one (``remove_stale``).
Readers take no lock: every write is a rename, and superseded files are kept one generation (see
``bundle.write_policy``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BundleError

__all__ = ["bundle_lock", "remove_stale", "dead_writer", "pid_alive", "LOCK_TIMEOUT_S"]

LOCK_TIMEOUT_S = 60.0  # every critical section is a few file writes; a lock held longer belongs to a stuck writer


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def lock_path(bundle: Path) -> Path:
    bundle = Path(bundle).absolute()
    return bundle.with_name(f".{bundle.name}.lock")


@contextmanager
def bundle_lock(bundle: str | os.PathLike[str], purpose: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the bundle's write lock (waiting up to ``timeout_s`` for another writer)."""
    path = lock_path(Path(bundle))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"{path} is a symlink; remove it (edgequee's lock file is a plain file)") from e
        raise BundleError(f"cannot create the lock file {path} ({e.strerror}); make {path.parent} writable") from e
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    raise BundleError(f"{bundle} is being written by {owner} for more than {timeout_s:g} s; "
                                      "wait for it to finish, or stop it") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({purpose})\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_PID = re.compile(r"-(\d+)-")


def dead_writer(name: str, prefix: str) -> bool:
    """True for ``<prefix><pid>-...`` whose writer ``pid`` is no longer running."""
    m = _PID.match(name[len(prefix) - 1:]) if name.startswith(prefix) else None
    return m is not None and not pid_alive(int(m.group(1)))


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove ``folder/<prefix><pid>-*`` entries (files or directories) whose writer ``pid`` is dead; return them.

    Never follows a symlink: a symlinked entry is unlinked, its target untouched."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not dead_writer(e.name, prefix):
            continue
        p = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
