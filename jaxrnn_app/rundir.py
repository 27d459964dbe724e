"""The run directory's file-system rules: one writer, whole rows, atomic files, one-line errors.

Plain Python (no JAX), so that the command line can use it before JAX is imported.

* **One writer.** ``lock(path)`` takes an exclusive ``fcntl.flock`` on the directory
  itself (no lock file is written, and the kernel drops the lock with the process, so
  a SIGKILL never leaves it stale); a second writer gets ``Locked``, naming the
  holder's pid (read from ``/proc/locks``). ``lock(path, shared=True, wait=True)`` is a
  reader's lock: the checkpointer saves under an exclusive lock of its directory and
  reads under a shared one, so a reader never sees a checkpoint pruned mid-read.
* **Whole rows.** ``RowWriter`` appends each ``metrics.jsonl`` row with one
  ``os.write`` (unbuffered: on disk as far as the kernel is concerned once it
  returns). ``read_rows`` reads them back and tells a torn last row (a write cut
  short by a full disk or a kill: bytes after the last newline) apart from a damaged
  file (a line in the middle that is not a row), which it refuses naming the line.
* **Atomic small files.** ``write_atomic`` (and ``atomic_path`` for writers that
  take a path, like matplotlib's ``savefig``) write a temporary file beside the
  target and rename it over it: a reader sees the old file or the new one, never half.
* **One line per OS error.** ``describe(e)`` is ``PATH: No space left on device
  (ENOSPC)``; ``check_writable`` and ``free_bytes`` are the checks made before a run's
  first step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple


class Locked(Exception):
    """Another process holds the directory's lock.

    Attributes:
        path: the locked directory.
        pid: the holder's process id, or None where ``/proc/locks`` does not say.
    """

    def __init__(self, path: Path, pid: int | None):
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.pid = path, pid


class WriteFailed(RuntimeError):
    """Writing a run failed after it started (a full disk, a file system gone read-only):
    one line; the run resumes from its last good checkpoint (exit status 1)."""


# An OS error inside another error's message: tensorstore's ``[os_error_code='28']``
# (orbax's array writes), Python's ``[Errno 28]``.
_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def cause(e: BaseException) -> str:
    """What went wrong, in one line: ``No space left on device (ENOSPC)`` for an OS
    error (also one that another library reports in its message, as tensorstore does
    for orbax's array writes), else ``TYPE: MESSAGE`` (shortened)."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := _ERRNO_IN_TEXT.search(str(e))):
        code = int(m.group(1) or m.group(2))
    if code is not None:
        why = (e.strerror if isinstance(e, OSError) and e.strerror else os.strerror(code))
        name = errno.errorcode.get(code)
        return f"{why} ({name})" if name else why
    return f"{type(e).__name__}: {one_line(str(e))}" if str(e) else type(e).__name__


def describe(e: OSError, path: str | os.PathLike | None = None) -> str:
    """``PATH: CAUSE`` for an OS error, e.g.
    ``/runs/r/metrics.jsonl: No space left on device (ENOSPC)``.

    Args:
        e: the error.
        path: the path to name (default: the error's own ``filename``, if any).
    """
    where = path if path is not None else e.filename
    return f"{where}: {cause(e)}" if where is not None else cause(e)


def one_line(text: str, n: int = 120) -> str:
    """``text`` on one line, shortened to ``n`` characters (ending ``...``)."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


# --- locks ---------------------------------------------------------------------

def holder_pid(path: str | os.PathLike) -> int | None:
    """The pid of a process holding a ``flock`` on ``path``, from ``/proc/locks`` (Linux);
    None where it cannot be read or names none."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 27525 fe:00:2155702 0 EOF"
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "1: -> FLOCK ...": a waiter
            continue
        try:
            major, minor, ino = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(ino)) == want:
                return int(fields[4])
        except ValueError:
            continue
    return None


# What flock raises where a file system has no usable locks (some network file systems).
_NO_LOCKS = {errno.ENOLCK, errno.EBADF, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


class DirectoryLock:
    """A held ``flock`` on a directory; ``release()`` (or the process's end) drops it."""

    def __init__(self, path: Path, fd: int | None, unsupported: str | None = None):
        self.path, self._fd = path, fd
        self.unsupported = unsupported  # why the file system gave no lock (None: held)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(path: str | os.PathLike, *, shared: bool = False, wait: bool = False
         ) -> DirectoryLock:
    """Locks directory ``path`` (a ``flock`` on the directory itself; nothing is written).

    Args:
        path: an existing directory.
        shared: a reader's lock (any number at once) instead of a writer's.
        wait: block until the lock is free; else raise ``Locked`` at once.

    Returns:
        The held ``DirectoryLock``. On a file system without locks it holds nothing
        and says why in ``unsupported``.

    Raises:
        Locked: ``wait=False`` and another process holds a conflicting lock.
        OSError: ``path`` cannot be opened (missing, not a directory, no permission).
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    import fcntl

    how = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        os.close(fd)
        raise Locked(path, holder_pid(path)) from None
    except OSError as e:
        os.close(fd)
        if e.errno in _NO_LOCKS:
            return DirectoryLock(path, None, describe(e, path))
        raise
    except BaseException:  # a signal while waiting
        os.close(fd)
        raise
    return DirectoryLock(path, fd)


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, shared: bool = False) -> Iterator[None]:
    """Holds a (waiting) lock of ``path`` for the block, where ``path`` is a directory;
    a missing directory or a file system without locks is not locked."""
    try:
        held = lock(path, shared=shared, wait=True)
    except (FileNotFoundError, NotADirectoryError):
        held = None
    try:
        yield
    finally:
        if held is not None:
            held.release()


def make_directory(path: str | os.PathLike) -> list[Path]:
    """Creates ``path`` and its missing parents.

    Returns:
        The directories created, deepest last (for ``remove_created``).

    Raises:
        OSError: as ``os.mkdir`` (``FileExistsError`` where ``path`` is a file).
    """
    path = Path(path).absolute()
    missing = []
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        created.append(d)
    if not path.is_dir():
        raise FileExistsError(errno.EEXIST, "a file, not a directory", str(path))
    return created


def remove_created(created: list[Path]) -> None:
    """Removes the directories ``make_directory`` created, where still empty."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


# --- files ---------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (``NAME.tmp.EXT``, the same extension) to write;
    renamed over ``path`` when the block ends without an error, removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename (``atomic_path``).

    Raises:
        OSError: the write or the rename failed; ``path`` is then unchanged.
    """
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` of all of ``data``; only a short write (a disk filling up) makes
    a second, which then raises the reason."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class RowWriter:
    """Appends JSON rows to a file, one ``os.write`` per row (nothing buffered).

    Args:
        path: the file (created if absent), or None to write nowhere (the processes of
            a multi-process run other than process 0).

    Raises (``write``):
        WriteFailed: the row could not be written whole (naming the file and the cause).
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self._fd = None
        if self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)

    def write(self, row: dict) -> None:
        if self._fd is None:
            return
        try:
            _write_all(self._fd, (json.dumps(row) + "\n").encode())
        except OSError as e:
            raise WriteFailed(f"cannot write {describe(e, self.path)}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Rows(NamedTuple):
    """A rows file read back: its whole rows and a torn last one."""

    lines: list[str]  # each whole row's text, without its newline
    rows: list[dict]  # the same rows, parsed
    torn: bytes  # the bytes after the last newline (a write cut short); b"" if none


def read_rows(path: str | os.PathLike) -> Rows:
    """Reads a JSON-rows file (``metrics.jsonl``) written by ``RowWriter``.

    Blank lines are skipped. Bytes after the last newline are a torn row (a write
    cut short), returned apart; every other line must be a JSON object.

    Raises:
        ValueError: a line before the last newline that is not a JSON object, naming
            the file and the line.
        OSError: the file cannot be read.
    """
    path = Path(path)
    data = path.read_bytes()
    whole, _, torn = data.rpartition(b"\n")
    lines, rows = [], []
    for n, raw in enumerate(whole.split(b"\n") if whole else [], start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode()
            row = json.loads(text)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path} line {n} is not a JSON row ({e}): repair or remove "
                             f"the line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n} is a JSON {type(row).__name__}, not a row "
                             f"(an object): repair or remove the line")
        lines.append(text)
        rows.append(row)
    return Rows(lines, rows, torn if torn.strip() else b"")


def side_path(path: str | os.PathLike, suffix: str) -> Path:
    """``PATH.SUFFIX``, or ``PATH.SUFFIX-2``, ``-3``, ... where taken: a name for keeping
    something aside without overwriting what an earlier time set aside."""
    path = Path(path)
    new, n = path.with_name(f"{path.name}.{suffix}"), 1
    while new.exists():
        n += 1
        new = path.with_name(f"{path.name}.{suffix}-{n}")
    return new


# --- checks before the first step ---------------------------------------------

def check_writable(directory: str | os.PathLike) -> None:
    """Creates and removes a small file in ``directory``: a write the way the run will
    write (``os.access`` answers for permissions only, not a read-only mount or quota).

    Raises:
        OSError: naming ``directory`` (permission, read-only file system, no space).
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxrnn-probe-", dir=directory)
    except OSError as e:
        e.filename = str(directory)
        raise
    try:
        _write_all(fd, b"\n")
    except OSError as e:
        e.filename = str(directory)
        raise
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an unprivileged process may still write on ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes the files under ``path`` occupy on disk (0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def format_bytes(n: float) -> str:
    """``12.3 MB`` (decimal units)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable
