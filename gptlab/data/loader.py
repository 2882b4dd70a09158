"""Reading a prepared data dir: random training windows keyed by (seed, step), and eval windows.

Batches are a pure function of (seed, step): no loader state to checkpoint, a resumed run sees
exactly the batches it would have seen, and any process can build any slice of a global batch
(data-parallel ranks and gradient-accumulation micro-steps just take different `sample_slice`s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gptlab.data.prepare import FORMAT, META_FILE, VERSION
from gptlab.data.shards import open_shard
from gptlab.errors import GptlabError

_EVAL_STREAM = 0x6576616C  # "eval": keeps fixed eval windows apart from the training (seed, step) stream


class TokenData:
    """The train/val token streams of a `gptlab prepare` output folder, memory-mapped."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir)
        self.meta = meta = _read_meta(self.data_dir)
        self.vocab_size: int = meta["vocab_size"]
        self.eot_id: int = meta["eot_id"]
        self.dtype = np.dtype(meta["dtype"])
        self._shards: dict[str, list[np.ndarray]] = {}
        self._offsets: dict[str, np.ndarray] = {}  # split -> global start of each shard, plus the end
        for split in ("train", "val"):
            shards = [open_shard(self.data_dir / name) for name in meta[split]["shards"]]
            for name, s in zip(meta[split]["shards"], shards):
                if s.dtype != self.dtype:
                    raise GptlabError(f"{self.data_dir / name}: holds {s.dtype}, meta.json says {self.dtype}")
            offsets = np.cumsum([0] + [len(s) for s in shards], dtype=np.int64)
            if offsets[-1] != meta[split]["tokens"]:
                raise GptlabError(
                    f"{self.data_dir}: {split} shards hold {offsets[-1]} tokens, meta.json says "
                    f"{meta[split]['tokens']}: re-run `gptlab prepare`"
                )
            self._shards[split], self._offsets[split] = shards, offsets

    def __repr__(self) -> str:
        return (f"TokenData({str(self.data_dir)!r}, vocab_size={self.vocab_size}, "
                f"train={self.n_tokens('train'):,}, val={self.n_tokens('val'):,} tokens)")

    def tokenizer(self) -> Any:
        from gptlab.tokenizer import load_tokenizer

        return load_tokenizer(self.data_dir)

    def n_tokens(self, split: str) -> int:
        return int(self._split_offsets(split)[-1])

    def read_tokens(self, split: str, start: int = 0, n: int | None = None) -> np.ndarray:
        """`n` tokens of a split from `start` (default: all the rest), as int64."""
        out = np.empty(self.n_tokens(split) - start if n is None else n, dtype=np.int64)
        self._read(split, start, out)
        return out

    def _split_offsets(self, split: str) -> np.ndarray:
        if split not in self._offsets:
            raise GptlabError(f"unknown split {split!r} (expected 'train' or 'val')")
        return self._offsets[split]

    def _check_fits(self, split: str, block_size: int) -> int:
        n = self.n_tokens(split)
        if block_size < 1 or n < block_size + 2:
            raise GptlabError(
                f"{self.data_dir}: the {split} split has {n:,} tokens, too few for block_size {block_size} "
                f"(needs at least {block_size + 2}): use a smaller block_size or more data"
            )
        return n

    # ---------------------------------------------------------------- random windows

    def window_starts(self, step: int, n: int, block_size: int, seed: int, split: str = "train") -> np.ndarray:
        """The n window starts of global step `step`: a function of (seed, step) only."""
        total = self._check_fits(split, block_size)
        if seed < 0 or step < 0:
            raise GptlabError(f"seed and step must be >= 0, got seed={seed} step={step}")
        return np.random.default_rng([seed, step]).integers(0, total - block_size - 1, size=n, dtype=np.int64)

    def windows(self, starts: np.ndarray, block_size: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """x = tokens[s : s+block_size], y = tokens[s+1 : s+block_size+1] for each start s, as int64."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        buf = np.empty((len(starts), block_size + 1), dtype=np.int64)
        for row, s in zip(buf, starts):
            self._read(split, int(s), row)
        if buf.size and int(buf.max()) >= self.vocab_size:  # a corrupt or hand-edited shard: no IndexError later
            raise GptlabError(f"{self.data_dir}: the {split} shards hold token id {int(buf.max())}, outside the "
                              f"vocabulary of {self.vocab_size} (meta.json); re-run `gptlab prepare`")
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    def _read(self, split: str, start: int, out: np.ndarray) -> None:
        """Fill `out` with the split's tokens from `start` on, crossing shard boundaries as needed."""
        offsets, shards = self._split_offsets(split), self._shards[split]
        if start < 0 or start + len(out) > offsets[-1]:
            raise IndexError(f"window [{start}, {start + len(out)}) outside the {split} split (0..{offsets[-1]})")
        k = int(np.searchsorted(offsets, start, side="right")) - 1
        pos = 0
        while pos < len(out):
            local = start + pos - int(offsets[k])
            take = min(len(out) - pos, len(shards[k]) - local)
            out[pos:pos + take] = shards[k][local:local + take]
            pos += take
            k += 1

    def get_batch(
        self, step: int, batch_size: int, block_size: int, seed: int, split: str = "train",
        sample_slice: slice | None = None, device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of `step` (batch_size windows), or just its `sample_slice` rows."""
        starts = self.window_starts(step, batch_size, block_size, seed, split)
        if sample_slice is not None:
            starts = starts[sample_slice]
        return _to_device(*self.windows(starts, block_size, split), device)

    # ---------------------------------------------------------------- evaluation

    def iter_eval_windows(
        self, block_size: int, batch_size: int, split: str = "val", max_batches: int | None = None,
        device: str | torch.device = "cpu",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Contiguous, non-overlapping windows over the whole split, each token predicted once.

        Window i is x = tokens[i*T : (i+1)*T] with targets shifted by one; the final partial
        window (fewer than T+1 tokens left) is dropped. The last batch may hold fewer windows.
        """
        n_windows = self.n_eval_windows(block_size, split)
        starts = np.arange(n_windows, dtype=np.int64) * block_size
        for b, i in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield _to_device(*self.windows(starts[i:i + batch_size], block_size, split), device)

    def n_eval_windows(self, block_size: int, split: str = "val") -> int:
        """How many windows iter_eval_windows yields in total (for progress bars / averaging)."""
        self._check_fits(split, block_size)
        return (self.n_tokens(split) - 1) // block_size

    def fixed_eval_batches(
        self, n_batches: int, batch_size: int, block_size: int, seed: int, split: str = "val",
        device: str | torch.device = "cpu",
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n_batches random batches that are the same on every call (cheap, low-noise periodic eval).

        Drawn from a stream separate from training's, so evaluating on "train" does not reuse
        the windows of training steps 0..n_batches-1. Built once on `device`: keep and reuse them.
        """
        total = self._check_fits(split, block_size)
        batches = []
        for i in range(n_batches):
            rng = np.random.default_rng([seed, _EVAL_STREAM, i])
            starts = rng.integers(0, total - block_size - 1, size=batch_size, dtype=np.int64)
            batches.append(_to_device(*self.windows(starts, block_size, split), device))
        return batches


def _to_device(x: np.ndarray, y: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if torch.device(device).type == "cuda":
        # Pinned host memory lets the copy run asynchronously with compute.
        return xt.pin_memory().to(device, non_blocking=True), yt.pin_memory().to(device, non_blocking=True)
    return xt.to(device), yt.to(device)


def _read_meta(data_dir: Path) -> dict[str, Any]:
    path = data_dir / META_FILE
    if not data_dir.is_dir():
        raise GptlabError(f"{data_dir}: no such data folder: run `gptlab prepare` first")
    if not path.is_file():
        raise GptlabError(f"{data_dir}: not a gptlab data dir (no {META_FILE}): run `gptlab prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path}: corrupt ({e}): re-run `gptlab prepare`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GptlabError(f"{path}: not a gptlab data meta file (format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise GptlabError(f"{path}: unsupported data version {meta.get('version')!r} (this gptlab reads {VERSION})")
    splits_ok = all(
        isinstance(meta.get(s), dict) and isinstance(meta[s].get("shards"), list)
        and isinstance(meta[s].get("tokens"), int) for s in ("train", "val")
    )
    if not (splits_ok and isinstance(meta.get("vocab_size"), int) and isinstance(meta.get("eot_id"), int)
            and meta.get("dtype") in ("uint16", "uint32")):
        raise GptlabError(f"{path}: corrupt (missing or bad fields): re-run `gptlab prepare`")
    return meta
