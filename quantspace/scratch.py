"""Folders a job writes into before anything is final, and the cleanup of those a killed job left behind.

Each folder holds a `.lock` file that its job keeps locked (flock) while it runs. The kernel drops the lock
when the process dies, however it dies (SIGKILL included), so the next job can tell a folder in use from one
left behind and remove only the latter. Locks are per open file, so two jobs in one process (the Space) also
see each other's folders as in use.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: fall back to "is the PID alive"
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(folder: Path) -> bool:
    """True when no running job holds `folder`'s lock (its writer was killed or crashed)."""
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        # Created, then killed before the lock existed: the PID in the name tells whether its job still runs.
        return not _pid_alive(_pid_in(folder.name))
    except OSError:
        return False
    try:
        if fcntl is None:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            return not (pid.isdigit() and _pid_alive(int(pid)))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno != errno.ENOLCK:
                return False    # held: its job is running
            pid = os.read(fd, 32).decode(errors="replace").strip()
            return not (pid.isdigit() and _pid_alive(int(pid)))
        return True   # our lock on it goes away with the fd below; the folder is removed right after
    finally:
        os.close(fd)


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders named `prefix*` under `parent` that no running job holds; returns them."""
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    # A folder still being set up (killed in those few microseconds): only its PID can tell.
    setup = f".setup-{prefix.lstrip('.')}"
    for folder in (p for p in parent.iterdir() if p.name.startswith(setup) and p.is_dir()):
        if not _pid_alive(_pid_in(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _pid_in(name: str) -> int:
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


class LockedDir:
    """A new folder `parent/<prefix><pid>-<random>` locked for this job; `close()` removes it.

    Use as a context manager: the folder and everything in it is gone when the block ends, whatever the outcome.
    """

    def __init__(self, parent: Path, prefix: str):
        parent.mkdir(parents=True, exist_ok=True)
        name = f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        # Set up under a name no sweep looks at, then renamed (atomic): a sweep never sees it unlocked.
        setup = parent / f".setup-{name.lstrip('.')}"
        setup.mkdir()
        try:
            self._fd: int | None = os.open(setup / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno != errno.ENOLCK:   # a filesystem without locks: the PID written below says it
                        raise
            os.write(self._fd, str(os.getpid()).encode())
            self.path = parent / name
            os.rename(setup, self.path)
        except BaseException:
            shutil.rmtree(setup, ignore_errors=True)
            raise

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "LockedDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
