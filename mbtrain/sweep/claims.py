"""Which process does what, for several `mbtrain sweep` processes sharing one sweep folder (on one machine, or on
many through a shared filesystem): a claim file per trial or run, made exclusively with its whole content (a token
of its own, the host, the process and when that process started), and touched by a heartbeat thread while the
process lives. A claim of this host (this machine's boot and process namespace: containers apart count as hosts
apart) is abandoned once its process is gone (no such process, or another that reuses the number); one of another
host once its heartbeat has stopped for STALE seconds. An abandoned claim may be taken over, so that an
interrupted sweep, run again, picks up what the dead process held; taking one over happens under a lock on the
folder, so that two processes never both take the same one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FOLDER = "claims"  # SWEEP/claims: where the processes sharing a sweep folder keep their claims
HEARTBEAT = 30.0  # seconds between touches of the claims a process holds
STALE = 300.0  # a claim without a touch for this long is a dead (or hung) process's


class Claims:
    """This process's claims in `folder` (SWEEP/claims)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.held: dict[Path, str] = {}  # claim file -> its token
        pid = os.getpid()
        self.me = {"host": _host(), "pid": pid, "started": _started(pid)}
        self._beating: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, sweep: Path) -> Claims:
        """This process's claims in the sweep folder `sweep`."""
        return cls(sweep / FOLDER)

    def take(self, name: str) -> bool:
        """Claim `name` for this process: True if it is now ours (free, ours already, or abandoned)."""
        path = self.folder / f"{name}.claim"
        if path in self.held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        with locked(self.folder / ".lock"):
            if path.exists():
                if not self._abandoned(path):
                    return False
                path.unlink(missing_ok=True)
            if not create(path, json.dumps({**self.me, "token": token})):
                return False  # another process made it meanwhile (only where the filesystem has no locks)
        with self._lock:
            self.held[path] = token
        self._beat()
        return True

    def release(self, name: str) -> None:
        """Give `name` back (its file is removed only while it is still this process's claim)."""
        path = self.folder / f"{name}.claim"
        with self._lock:
            token = self.held.pop(path, None)
        if token is not None and _owner(path).get("token") == token:
            path.unlink(missing_ok=True)

    def holds(self, name: str) -> bool:
        """Whether `name` is still this process's claim (not taken over while this process was stopped)."""
        path = self.folder / f"{name}.claim"
        return path in self.held and _owner(path).get("token") == self.held[path]

    def busy(self, name: str) -> bool:
        """Whether another live process holds `name`."""
        path = self.folder / f"{name}.claim"
        return path not in self.held and path.exists() and not self._abandoned(path)

    def seen(self, name: str) -> bool:
        """Whether `name` was ever claimed (its claim file exists, live or not)."""
        return (self.folder / f"{name}.claim").exists()

    def holder(self, name: str) -> str:
        """`host:pid` of the process that holds `name` (for a line saying what a process waits for)."""
        owner = _owner(self.folder / f"{name}.claim")
        return f"{str(owner.get('host', '?')).split('/')[0]}:{owner.get('pid', '?')}"

    def _abandoned(self, path: Path) -> bool:
        owner = _owner(path)
        try:
            touched = path.stat().st_mtime
        except OSError:
            return True  # gone meanwhile
        if not owner:
            return True
        if owner.get("host") != self.me["host"]:
            return time.time() - touched > STALE
        pid = int(owner.get("pid", 0))
        if pid == self.me["pid"]:  # this process's number, yet not a claim it holds: a dead process's that had it
            return True
        if not _alive(pid):
            return True
        theirs, now = owner.get("started"), _started(pid)
        return theirs is not None and now is not None and theirs != now  # its number reused by another process

    def _beat(self) -> None:
        """Start the heartbeat thread once (a daemon: it dies with the process, which is the point)."""
        if self._beating is None:
            self._beating = threading.Thread(target=self._touch_forever, name="mbtrain-claims", daemon=True)
            self._beating.start()

    def _touch_forever(self) -> None:
        while True:
            time.sleep(HEARTBEAT)
            with self._lock:
                held = dict(self.held)
            for path, token in held.items():
                if _owner(path).get("token") == token:  # never freshen a claim another process has taken over
                    try:
                        os.utime(path)
                    except OSError:
                        pass  # released meanwhile


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file at `path` (made if missing) for the block: between processes, on one host or,
    through the filesystem's locks, several. On a filesystem without locks, none: one process still works there,
    processes sharing a folder may then repeat work (docs/sweep.md)."""
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create(path: Path, text: str) -> bool:
    """Make `path` holding `text`, whole, unless it exists: False if it does."""
    written = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    written.write_text(text)
    try:
        os.link(written, path)  # appears whole or not at all
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive creation, then the text
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as file:
                file.write(text)
        except FileExistsError:
            return False
    finally:
        written.unlink(missing_ok=True)
    return True


def _host() -> str:
    """This host as claims name it: the machine's name, its boot and the process namespace (so that containers
    that share a name but not their process numbers are told apart)."""
    parts = [socket.gethostname()]
    for source in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8],
                   lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(source())
        except OSError:
            pass
    return "/".join(parts)


def _owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


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


def _started(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (Linux's /proc/PID/stat field 22; None elsewhere): with
    the number, what tells a process from a later one that reuses its number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
