"""One writer per piece of a run folder: ``with writer_lock(run_dir, "generate", "anyms.0-of-1"): ...``.

A lock is ``<run_dir>/locks/<stage>.<name>.lock`` held with ``fcntl.flock``. We use flock directly (not
the ``filelock`` package) because a second writer must be told *who* holds the lock: the holder writes its
pid, host, command and start time into the file. The kernel drops a flock when its process dies, SIGKILL
included, so a crashed writer never leaves a lock behind; the stale holder text is simply overwritten.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCKS = "locks"


class RunFolderLockedError(RuntimeError):
    """Another process holds the lock; the message names it (pid, host, command, since when)."""


def lock_path(run_dir: str | os.PathLike, stage: str, name: str) -> Path:
    return Path(run_dir) / LOCKS / f"{stage}.{name}.lock"


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process (it has not written its name yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('command', '?')})"


@contextmanager
def writer_lock(run_dir: str | os.PathLike, stage: str, name: str, wait: bool = False):
    """Holds ``stage.name``'s lock of the run folder for the ``with`` block. ``wait=False``: raise
    :class:`RunFolderLockedError` naming the holder at once; ``wait=True``: block until it is free
    (for short critical sections such as drawing a contact sheet)."""
    path = lock_path(run_dir, stage, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderLockedError(
                f"{stage} of {name} in {run_dir} is already running: {_describe(path)}. Wait for it to finish or "
                f"stop it; a second writer would write every image twice (lock: {path})") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a released lock names nobody
    finally:
        os.close(fd)  # closing the descriptor releases the flock
