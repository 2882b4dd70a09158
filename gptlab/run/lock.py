"""One writer per run directory: every writing command holds an exclusive lock on its output directory for
its whole run, so two runs can never interleave their checkpoints, metrics or config.

The lock is an OS file lock (flock) on OUT/.gptlab.lock, which the kernel releases when the process ends
however it ends (kill -9 included): a stale lock cannot block. The file records the holder (PID, command,
start time) for the error message. Where flock is missing (Windows), the file itself is the lock and a
holder whose PID no longer runs is taken over. While holding the lock a command may clean up what a killed
writer left (temporary files); a failed command that created the directory and wrote nothing removes it.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import sys
import time
from pathlib import Path

from gptlab.errors import GptlabError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".gptlab.lock"
_held: dict[str, list] = {}  # resolved path -> [fd, depth]: a process may enter its own lock again


def _describe(path: Path) -> str:
    try:
        pid, _, rest = path.read_text().partition(" ")
        return f"PID {pid}{': ' + rest.strip() if rest.strip() else ''}"
    except OSError:
        return "another process"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _take(path: Path) -> int:
    """Open and lock `path`, or raise naming the holder."""
    if fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GptlabError(f"{path.parent} is in use by another gptlab run ({_describe(path)}); wait for it to "
                              "finish, or write to another --out") from None
        return fd
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pid = int((path.read_text().split() or ["0"])[0] or 0)
        if pid and _pid_alive(pid):
            raise GptlabError(f"{path.parent} is in use by another gptlab run ({_describe(path)}); wait for it to "
                              "finish, or write to another --out") from None
        path.unlink(missing_ok=True)  # its holder is gone
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def _clean_leftovers(run_dir: Path) -> None:
    """Temporary files and checkpoint folders of a writer that was killed mid-write (atomic writes go to
    .NAME.*.tmp, checkpoints to checkpoints/.step_N.tmp); only the lock holder may remove them."""
    for d in (run_dir, run_dir / "checkpoints"):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


class RunLock:
    """`with RunLock(out):` — the exclusive right to write `out` (created if missing)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.created = False

    def __enter__(self) -> "RunLock":
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise GptlabError(f"--out {d} is a file, not a directory")
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 writes, and it holds the lock
            return self
        key = str(d.resolve())
        if key in _held:
            _held[key][1] += 1
            return self
        self.created = not d.exists()
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = _take(d / LOCK_FILE)
        except OSError as e:
            raise GptlabError(f"cannot write {d}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        command = " ".join(["gptlab", *sys.argv[1:]])
        command = command if len(command) <= 120 else command[:119] + "…"
        os.write(fd, f"{os.getpid()} {command}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        _held[key] = [fd, 1]
        _clean_leftovers(d)
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.run_dir.resolve())
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1]:
            return
        del _held[key]
        fd = entry[0]
        empty = self.created and {p.name for p in self.run_dir.iterdir()} <= {LOCK_FILE}
        try:
            os.ftruncate(fd, 0)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if fcntl is None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        if empty:  # a command that failed before writing anything leaves no trace
            shutil.rmtree(self.run_dir, ignore_errors=True)


def writes_run_dir(arg: str = "out_dir"):
    """Decorate a command that writes the directory passed as `arg`: it holds that directory's lock for the
    whole call (`@writes_run_dir()` on `def sft(out_dir, ...)`)."""
    def decorate(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            bound = sig.bind(*args, **kwargs).arguments
            if bound.get("resume") and not Path(bound[arg]).is_dir():  # nothing to resume: create nothing
                raise GptlabError(f"run directory not found: {bound[arg]}")
            with RunLock(bound[arg]):
                return fn(*args, **kwargs)
        return locked
    return decorate
