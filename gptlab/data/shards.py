"""Token shards: a 64-byte little-endian header followed by the raw tokens (uint16 or uint32).

Header layout (offsets in bytes):
    0  magic      8s   b"GPTLABTK"
    8  version    u32  1
    12 itemsize   u32  2 (uint16) or 4 (uint32)
    16 count      u64  number of tokens
    24 vocab_size u32
    28 ...            zero padding up to 64 bytes
The fixed-size header lets `open_shard` memory-map the tokens without reading them, and the
explicit count lets it detect a truncated file (an interrupted copy) before training on it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from gptlab.errors import GptlabError

MAGIC = b"GPTLABTK"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQI")  # magic, version, itemsize, count, vocab_size
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclass(frozen=True)
class ShardHeader:
    itemsize: int
    count: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.itemsize]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536; larger vocabularies (e.g. cl100k) need uint32."""
    return _DTYPES[2] if vocab_size <= 65536 else _DTYPES[4]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file in the same directory, fsync, then os.replace onto `path`.

    Readers see either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), hence best-effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> int:
    """Atomically write `tokens` (1-D integers in [0, vocab_size)) as a shard. Returns bytes written."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise GptlabError(f"{path}: shard tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if not 0 < vocab_size < 2**32:
        raise GptlabError(f"{path}: invalid vocab_size {vocab_size}")
    dtype = dtype_for_vocab(vocab_size)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise GptlabError(
            f"{path}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]"
        )
    data = np.ascontiguousarray(tokens, dtype=dtype)
    header = _HEADER.pack(MAGIC, VERSION, dtype.itemsize, data.size, vocab_size).ljust(HEADER_BYTES, b"\0")
    with atomic_open(path) as f:
        f.write(header)
        f.write(memoryview(data).cast("B"))
    return HEADER_BYTES + data.nbytes


class ShardFile:
    """A shard written in parts (bounded memory): tokens are appended to a temp file beside `path`, and
    close() writes the header with the final count, fsyncs and renames it into place."""

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        if not 0 < vocab_size < 2**32:
            raise GptlabError(f"{path}: invalid vocab_size {vocab_size}")
        self.path, self.vocab, self.dtype, self.count = Path(path), vocab_size, dtype_for_vocab(vocab_size), 0
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, "wb")
        self.f.write(b"\0" * HEADER_BYTES)

    def append(self, tokens: np.ndarray) -> None:
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            self.abort()
            raise GptlabError(f"{self.path}: token ids must lie in [0, {self.vocab}), got [{tokens.min()}, {tokens.max()}]")
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.f.write(memoryview(data).cast("B"))
        self.count += data.size

    def close(self) -> int:
        """-> bytes written."""
        self.f.seek(0)
        self.f.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, self.vocab).ljust(HEADER_BYTES, b"\0"))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return HEADER_BYTES + self.count * self.dtype.itemsize

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
            os.unlink(self.tmp)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and validate a shard's header and size; raises GptlabError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise GptlabError(f"{path}: token shard not found") from None
    except OSError as e:
        raise GptlabError(f"{path}: cannot read token shard ({e.strerror})") from None
    if not raw:
        raise GptlabError(f"{path}: empty file, not a gptlab token shard")
    if raw[:8] != MAGIC:
        raise GptlabError(f"{path}: not a gptlab token shard (bad magic {raw[:8]!r})")
    if len(raw) < HEADER_BYTES:
        raise GptlabError(f"{path}: truncated token shard (header is {len(raw)} of {HEADER_BYTES} bytes)")
    _, version, itemsize, count, vocab_size = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise GptlabError(f"{path}: unsupported token shard version {version} (expected {VERSION})")
    if itemsize not in _DTYPES:
        raise GptlabError(f"{path}: corrupt token shard header (itemsize {itemsize}, expected 2 or 4)")
    if any(raw[_HEADER.size:]) or vocab_size == 0 or (itemsize == 2 and vocab_size > 65536):
        raise GptlabError(f"{path}: corrupt token shard header")
    expected = HEADER_BYTES + count * itemsize
    if size < expected:
        raise GptlabError(f"{path}: truncated token shard ({size} bytes, header says {expected})")
    if size > expected:
        raise GptlabError(f"{path}: corrupt token shard ({size - expected} bytes past the {count} tokens)")
    return ShardHeader(itemsize, count, vocab_size)


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Validate a shard and memory-map its tokens read-only (no data is read until indexed)."""
    header = read_header(path)
    if header.count == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.count,))
