"""Which process does what, for several `mbtrain sweep` processes sharing one sweep folder (on one machine, or on
many through a shared filesystem): a claim file per trial or run, made exclusively, naming its host and process,
and touched by a heartbeat thread while that process lives. A claim whose process is gone (on this host: no such
process; elsewhere: no heartbeat for STALE seconds) may be taken over, so that an interrupted sweep, run again,
picks up what the dead process held. Taking one over happens under a lock on the folder, so that two processes
never both take the same one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HEARTBEAT = 30.0  # seconds between touches of the claims a process holds
STALE = 300.0  # a claim from another host without a touch for this long is its dead process's


class Claims:
    """This process's claims in `folder` (SWEEP/claims)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.held: set[Path] = set()
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._beating: threading.Thread | None = None
        self._lock = threading.Lock()

    def take(self, name: str) -> bool:
        """Claim `name` for this process: True if it is now ours (free, ours already, or its process gone)."""
        path = self.folder / f"{name}.claim"
        if path in self.held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        with locked(self.folder / ".lock"):
            if path.exists() and not self._abandoned(path):
                return False
            path.unlink(missing_ok=True)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as file:
                json.dump(self.me, file)
        with self._lock:
            self.held.add(path)
        self._beat()
        return True

    def release(self, name: str) -> None:
        path = self.folder / f"{name}.claim"
        with self._lock:
            self.held.discard(path)
        path.unlink(missing_ok=True)

    def busy(self, name: str) -> bool:
        """Whether another live process holds `name`."""
        path = self.folder / f"{name}.claim"
        return path not in self.held and path.exists() and not self._abandoned(path)

    def seen(self, name: str) -> bool:
        """Whether `name` was ever claimed (its claim file exists, live or not)."""
        return (self.folder / f"{name}.claim").exists()

    def _abandoned(self, path: Path) -> bool:
        try:
            owner = json.loads(path.read_text())
            touched = path.stat().st_mtime
        except (OSError, ValueError):  # gone meanwhile, or half written by a process killed at once
            return True
        if owner.get("host") == self.me["host"]:
            return not _alive(int(owner.get("pid", 0)))
        return time.time() - touched > STALE

    def _beat(self) -> None:
        """Start the heartbeat thread once (a daemon: it dies with the process, which is the point)."""
        if self._beating is None:
            self._beating = threading.Thread(target=self._touch_forever, name="mbtrain-claims", daemon=True)
            self._beating.start()

    def _touch_forever(self) -> None:
        while True:
            time.sleep(HEARTBEAT)
            with self._lock:
                held = list(self.held)
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass  # released meanwhile


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file at `path` (made if missing) for the block: between processes, on one host or,
    through the filesystem's locks, several."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
