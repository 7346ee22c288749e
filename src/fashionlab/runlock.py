"""One writer per run folder: an advisory lock that every command writing into a run folder holds.

Two processes told to train into one folder used to both start, and the second's files replaced the
first's without a word. Now each writer takes `RUN/.lock` with flock(2) before it writes anything, and
holds it for as long as it writes; a second writer fails at once, with one line naming the folder and
the process that holds it (pid, host, command, since when), or, where waiting suits the caller
(a study, `train(reuse=True)`), waits for it and then looks at the folder again.

The lock belongs to the open file, so it dies with the process however the process ends (a crash, a
kill -9, a lost machine on a local disk): a folder is never left locked. The holder's description in
the file is only for messages; the lock itself is the flock. The file goes when its holder is done
(one a killed holder leaves behind is empty of meaning: the next writer takes it over). Readers (evaluate, predict, serve,
reports read from files) take no lock: every file is replaced whole by a rename (atomic.py), so they
see the old file or the new one, never half of one.

A process holds a folder's lock re-entrantly (training fits the out-of-distribution detector into
the folder it holds), so code that writes into a run folder can take the lock without knowing
whether its caller already has.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from .atomic import OutputError
from .errors import UserError

LOCK_FILE = ".lock"
POLL_SECONDS = 0.2  # how often a waiting writer tries again
_COMMAND_CHARS = 300  # the holder's command line as recorded: enough to recognise it

_held: dict[str, tuple[int, int]] = {}  # folder's real path -> (open lock file, depth); this process's locks
_held_guard = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child shares its parent's open lock files, not the parent's right to write: it starts
    with no lock of its own (and leaves the parent's files open, so the parent keeps its locks)."""
    global _held_guard
    _held.clear()
    _held_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class RunBusy(UserError):
    """Another process is writing into the run folder. `holder` describes it (pid, host, command,
    since), as far as it could be read."""

    def __init__(self, folder: Path, holder: dict):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is being written by {describe_holder(holder)}; wait for it to finish or "
                         f"use another folder")


def describe_holder(holder: dict) -> str:
    """'pid 123 on host (fashionlab train --out r) since 2026-12-04 19:30:05', or what is known of it."""
    if not holder.get("pid"):
        return "another process"
    text = f"pid {holder['pid']}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        text += f" on {holder['host']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text + (f" since {holder['since']}" if holder.get("since") else "")


def read_holder(folder: str | os.PathLike) -> dict:
    """What the lock file says of the process holding it ({} when it cannot be read: no holder, or one
    that has not written its name yet). Taking no lock, it is only a description."""
    try:
        with open(Path(folder) / LOCK_FILE, "rb") as fh:
            raw = fh.read(4096)
        holder = json.loads(raw) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def writing(folder: str | os.PathLike, wait: bool = False, on_wait: Callable[[dict], None] | None = None,
            create: bool = False) -> Iterator[Path]:
    """Hold the folder's writer lock for the block; create=True makes the folder first (a new run's).
    Without it a folder that does not exist holds nothing to guard: the block runs, and fails with
    its own message naming the missing run.

    A folder another process holds raises RunBusy at once, or with wait=True waits until it is free,
    calling on_wait(holder) once first (to say what it waits for). Raises OutputError when the
    folder cannot hold a lock file (read-only, no permission): it cannot be written either."""
    folder = Path(folder)
    if not create and not folder.is_dir():
        yield folder
        return
    key = _key(folder)
    with _held_guard:  # held already by this process: one more level
        entered = key in _held
        if entered:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
    if not entered:
        fd = _acquire(folder, wait, on_wait, create)
        with _held_guard:
            _held[key] = (fd, 1)
    try:
        yield folder
    finally:
        _release(key)


def check_free(folder: str | os.PathLike | None) -> None:
    """Raise RunBusy when another process holds the folder's lock now. Only a quick first look, so
    that a command refused fails before it loads anything heavy (torch, the dataset); the writer takes
    the lock itself later, and that is what makes the check and the writing one step."""
    if folder is None or _key(Path(folder)) in _held:
        return
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file (a new folder), or one that cannot be opened: the writer will say
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunBusy(Path(folder), _holder_of_busy(Path(folder))) from None
    finally:
        os.close(fd)


def writing_into(run_dir: str | os.PathLike, out: str | os.PathLike | None = None):
    """The run folder's writer lock when `out` (None: a file of the run folder's own) is in the run
    folder; nothing to hold when it goes elsewhere (an export to another folder reads the run only)."""
    inside = out is None or Path(out).resolve().parent == Path(run_dir).resolve()
    return writing(run_dir) if inside else nullcontext(Path(run_dir))


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def _acquire(folder: Path, wait: bool, on_wait: Callable[[dict], None] | None, create: bool) -> int:
    told = False
    while True:
        fd = _open_lock_file(folder, create)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder_of_busy(folder)
            if not wait:
                raise RunBusy(folder, holder) from None
            if on_wait and not told:
                on_wait(holder)
                told = True
            time.sleep(POLL_SECONDS)
            continue
        # The file we locked may have been removed (a failed new run takes its empty folder away) after
        # we opened it: a lock on a file no longer in the folder guards nothing, so start again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(folder / LOCK_FILE))
        except FileNotFoundError:
            same = False
        if same:
            _describe_self(fd)
            return fd
        os.close(fd)


def _open_lock_file(folder: Path, create: bool) -> int:
    path = folder / LOCK_FILE
    try:
        if create:  # again on each try: a failed new run that was waited for may have taken its folder away
            folder.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                       errno.EEXIST, errno.EISDIR):
            raise OutputError(f"cannot write {folder}: {e.strerror or e}", e.errno) from None
        raise


def _holder_of_busy(folder: Path) -> dict:
    """The holder's description; a holder that has just taken the lock writes it within moments."""
    for _ in range(10):
        holder = read_holder(folder)
        if holder:
            return holder
        time.sleep(0.02)
    return {}


def _describe_self(fd: int) -> None:
    """Write who holds the lock (for the message a second writer gets). A full disk may refuse even
    these few bytes: the lock holds all the same, the message then says 'another process'."""
    command = " ".join([_program(), shlex.join(sys.argv[1:])]).strip()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:_COMMAND_CHARS],
              "since": datetime.now().isoformat(sep=" ", timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError:
        pass


def _program() -> str:
    """The command's name as the user typed it: `fashionlab`, `python -m fashionlab`, a script's name."""
    first = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    return f"python -m {first.parent.name}" if first.name == "__main__.py" else first.name


def _release(key: str) -> None:
    """The last release removes the lock file, so a folder nobody writes holds no trace of the lock
    (a writer that opened the file just before finds it gone once it has the lock, and starts again)."""
    with _held_guard:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
    path = Path(key) / LOCK_FILE
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            path.unlink()
    except OSError:  # already gone with its folder, or a folder that became read-only: the flock still ends
        pass
    os.close(fd)  # releases the flock
