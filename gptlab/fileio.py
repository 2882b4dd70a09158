"""Atomic file writes and checked JSON reads: the lowest layer, used by run dirs, caches and reports."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from gptlab.errors import GptlabError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then fsync + os.replace: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the user's group
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (disk full, read-only) raised as the OSError every other
    write raises, so callers report them the same way."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GptlabError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{what} {path} is corrupt: {e}") from None
