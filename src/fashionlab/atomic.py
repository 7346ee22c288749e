"""Write a file so that a reader sees the old file or the new one, never half of one; and check,
before any work, that an output place can be written at all."""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from .errors import UserError


class OutputError(UserError, OSError):
    """An output place that cannot be written: the message names the path and why. It is an OSError
    too, so a caller that tolerates a failed write (a read-only cache costs only speed) still can;
    `errno` is the cause's (ENOSPC for a full disk, EROFS, EACCES, ...) where there was one."""

    def __init__(self, message: str, cause_errno: int | None = None):
        super().__init__(message)
        self.errno = cause_errno

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)

    def with_note(self, note: str) -> "OutputError":
        """The same error, its message followed by what was kept and how to go on."""
        return type(self)(f"{self}; {note}", self.errno)


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """Raise OutputError unless `path` (a file, or with folder=True a folder) can be created and written.

    Called before any work, so a long job fails at its start with the reason, not at its end. It tries
    for real (creates the missing folders and a probe file), because permission bits do not tell: root
    passes every access check, yet /proc or a read-only mount refuse. Everything it made is removed.
    """
    path = Path(path)
    reason = why_not_writable(path, folder)
    if reason:
        raise OutputError(f"cannot write {path}: {reason}")
    return path


def why_not_writable(path: Path, folder: bool = False) -> str | None:
    """Why `path` cannot be written (see check_writable), or None when it can; leaves nothing behind.

    Processes started together (a sweep's workers) check the same new folder at once: a folder another
    one made meanwhile is used and left to it, and one it removed again before the probe went in is
    made once more."""
    for _ in range(3):
        reason = _why_not_writable_once(path, folder)
        if reason is not _VANISHED:
            return reason
    return f"a folder on the way to {path} kept disappearing while it was tried"


_VANISHED = "a folder it made was removed meanwhile"  # by another process's check: try again


def _why_not_writable_once(path: Path, folder: bool) -> str | None:
    made: list[Path] = []
    try:
        if path.exists() and path.is_dir() != folder:
            return "it is a folder; expected a file name" if path.is_dir() else "it is a file; expected a folder"
        target = path if folder else path.parent
        for d in [*reversed(target.parents), target]:
            if d.exists() and not d.is_dir():
                return f"{d} is a file, not a folder"
            if not d.exists():
                try:
                    d.mkdir()
                except FileExistsError:
                    if not d.is_dir():
                        return f"{d} is a file, not a folder"
                    continue  # another process made it meanwhile: not ours to remove
                except OSError as e:
                    return f"cannot create the folder {d} ({e.strerror or e})"
                made.append(d)
        try:
            fd, probe = tempfile.mkstemp(dir=target, prefix=".fashionlab-probe.")
        except OSError as e:  # the probe's name would mean nothing to the user: name the folder
            if isinstance(e, FileNotFoundError) and not target.is_dir():  # not /proc's refusal: it is gone
                return _VANISHED
            return f"cannot create a file in {target} ({e.strerror or e})"
        os.close(fd)
        os.unlink(probe)
        return None
    except OSError as e:  # looking at the path failed: a name too long, a loop of links, no permission
        return e.strerror or str(e)
    finally:
        for d in reversed(made):
            with suppress(OSError):  # something else wrote into it meanwhile: it is no longer only ours
                d.rmdir()


def _names(e: OSError, tmp: Path) -> bool:
    return str(tmp) in {os.fspath(f) for f in (e.filename, e.filename2) if f is not None}


def _new_temporary(path: Path) -> Path:
    """An empty new file beside path, created with mode 0666 less the umask, as any file the user
    writes (mkstemp's 0600 would survive the rename: a run nobody else could read)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of path to write; rename it onto path if the block succeeds,
    delete it if it fails. Errors name path, never the temporary file the user has not heard of."""
    path = Path(path)
    try:
        if path.is_dir():  # os.replace would refuse only after the whole file was written
            raise OutputError(f"cannot write {path}: it is a folder; expected a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_temporary(path)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {path}: {why_not_writable(path) or e.strerror or e}", e.errno) from None
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        if isinstance(e, OutputError) or not (_names(e, tmp_path) or e.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise
        raise OutputError(f"cannot write {path}: {e.strerror or e}", e.errno) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes | bytearray) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)
