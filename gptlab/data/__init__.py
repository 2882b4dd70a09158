"""Data pipeline: corpus sources -> `prepare` (tokenize, split, shard) -> `TokenData` batches."""

from __future__ import annotations

from typing import Any

from gptlab.data.prepare import META_FILE, prepare
from gptlab.data.shards import open_shard, read_header, write_shard
from gptlab.data.sources import iter_documents, shakespeare_files

__all__ = [
    "META_FILE", "TokenData", "iter_documents", "open_shard", "prepare", "read_header",
    "shakespeare_files", "write_shard",
]


def __getattr__(name: str) -> Any:
    # Lazy: TokenData needs torch, which `prepare` and its worker processes never do.
    if name == "TokenData":
        from gptlab.data.loader import TokenData

        return TokenData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
