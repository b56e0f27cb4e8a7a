"""Atomic file writes: a reader never sees a half-written checkpoint, manifest or sample file.

``atomic_write`` writes a temporary file in the target's folder and ``os.replace``-s it into place, so
the target is always either the old file or the new one, whole. What each step buys:

- ``os.replace`` (an atomic rename on POSIX and Windows) is all a SIGKILL needs: the killed process's
  writes are already in the kernel's page cache and survive it; only the rename had to be atomic.
- ``fsync`` of the temporary file before the rename is what a power loss or kernel crash needs: without
  it the rename can reach the disk before the data, leaving an empty or partial file under the
  target's name after a reboot (ext4 ``data=writeback``, XFS, btrfs). ``fsync`` of the folder after the
  rename makes the rename itself durable, and keeps two renames in the order they were made. Both are on
  by default: about 5-15 ms per file on the SSD of a shared VM, against the hundreds of steps between
  two checkpoints of a training run.

A process killed between creating the temporary file and the rename leaves the temporary file behind
(``.NAME.XXXXXXXX.tmpSUFFIX``); ``remove_stale_temps`` deletes those, and ``folder_lock`` makes sure that
nobody else is writing into the folder when it does.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, folder_lock only records the pid
    fcntl = None

# ".NAME." + mkstemp's 8 random characters + ".tmp" + NAME's suffix (see atomic_write)
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?$")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or unlink in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then ``os.replace`` it into place.

    The temporary file keeps ``path``'s suffix (numpy appends ``.npz`` otherwise) and is removed
    if ``write`` fails. ``durable``: fsync the file before and the folder after the rename (module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        fsync_dir(path.parent)
    return path


def is_temp_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like one of ``atomic_write``'s temporary files."""
    return _TEMP_RE.match(Path(path).name) is not None


def stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of ``atomic_write`` in ``folder`` (left there by a killed writer, or being written now)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_temp_file(p) and p.is_file())


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete ``stale_temps(folder)``; returns them. Only safe while no one else writes into ``folder``
    (hold ``folder_lock``)."""
    removed = []
    for p in stale_temps(folder):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


class FolderBusyError(OSError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = ".lock") -> Iterator[Path]:
    """Hold an exclusive advisory lock (``flock``) on ``folder/name`` for the ``with`` block.

    Raises ``FolderBusyError`` (naming the holder's pid) when another process holds it. The kernel
    drops the lock when its holder dies, SIGKILL included, so a killed run never leaves it stuck; the
    file itself stays (it only records the last holder's pid).
    """
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise FolderBusyError(f"{folder} is in use by another process (pid {holder})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield path
    finally:
        f.close()  # releases the lock
