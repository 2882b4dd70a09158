"""`gptlab prepare`: corpus -> tokenizer file + train/val token shards + meta.json.

Layout of out_dir:
    tokenizer.gptlab.json            the tokenizer (char / bpe:N are trained on ALL documents, so
                                     every character of the val split is in the vocabulary)
    train_000000.bin, ...            token shards (see shards.py), at most shard_tokens each
    val_000000.bin, ...
    meta.json                        written last: its presence marks a complete data dir
Every document is followed by the end-of-text token (GPT-2/3's document separator), so the
token stream is doc0 <eot> doc1 <eot> ... and a training window may span documents.

Memory stays bounded whatever the corpus size: documents are read as a stream (a large text file in
pieces), tokenized by the worker pool a few batches at a time and appended to a spool file on disk; once
every document's length is known the split is decided, and the spool is copied into the shards in chunks.
Only the per-document lengths (8 bytes a document) are held.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from gptlab.data.shards import ShardFile, atomic_open, dtype_for_vocab
from gptlab.data.sources import iter_documents, iter_pieces
from gptlab.errors import GptlabError
from gptlab.run.lock import writes_run_dir

META_FILE = "meta.json"
SPOOL_FILE = ".tokens.spool"  # in out_dir while preparing: the token stream before the split
FORMAT = "gptlab-data"
VERSION = 1
MIN_DOCS_FOR_DOC_SPLIT = 10
# Below this many characters the pool's start-up costs more than it saves (tests lower it).
_INPROCESS_CHARS = 1 << 20
# Pieces are encoded in batches of about _MIN_BATCH_CHARS in process, _MAX_BATCH_CHARS / 4 per pool task (at
# most two tasks a worker in flight: with the 4 MiB pieces of a large file, memory stays a few batches).
_MIN_BATCH_CHARS, _MAX_BATCH_CHARS = 1 << 16, 1 << 22

_worker_tok: Any = None  # set in each pool worker by _init_worker


@writes_run_dir()
def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.1,
    seed: int = 1337,
    num_workers: int | None = None,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `source` into `out_dir`; returns meta.json's contents plus timing fields."""
    from gptlab.tokenizer import TOKENIZER_FILE, build_tokenizer, load_tokenizer

    if not 0 < val_fraction <= 0.5:
        raise GptlabError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if shard_tokens < 1:
        raise GptlabError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out}: exists and is not a folder")
    t0 = time.perf_counter()

    omni = _omni_tokenizer(tokenizer)
    # a trained tokenizer (char, bpe:N) reads the corpus once more, as a stream
    tok = omni or build_tokenizer(tokenizer, iter_documents(source, text_field=text_field)
                                  if _needs_training(tokenizer) else None, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    # Drop the old completion marker before the first write: a crash below must not leave an
    # old meta.json describing a mix of old and new files.
    (out / META_FILE).unlink(missing_ok=True)
    tok_path = out / TOKENIZER_FILE
    tok.save(tok_path)
    tok = load_tokenizer(tok_path)  # encode with exactly what workers and later readers load
    vocab_size, eot_id = tok.vocab_size, tok.eot_id

    t1 = time.perf_counter()
    dtype = dtype_for_vocab(vocab_size)
    spool = out / SPOOL_FILE  # every document's tokens, in corpus order, until the split is known
    try:
        with open(spool, "wb") as f:
            pieces = _conversation_pieces(source, tok) if omni else \
                _tokenize(iter_pieces(source, text_field=text_field), tok, tok_path, num_workers, progress)
            lengths, n_chars = _spool(pieces, f)
        t_tok = time.perf_counter() - t1
        n_tokens = int(lengths.sum())
        split_kind, is_val, cut, n_train_docs, n_val_docs = _split(lengths, val_fraction, seed)
        n_val = int(lengths[is_val].sum()) + (n_tokens - cut if cut is not None else 0)
        if n_val == 0:
            raise GptlabError(f"corpus {source} is too small: the val split ({val_fraction:.0%}) is empty")
        if n_val == n_tokens:
            raise GptlabError(f"corpus {source} is too small: the train split is empty")
        writers = {k: ShardWriter(out, k, shard_tokens, vocab_size) for k in ("train", "val")}
        try:
            for split, tokens in _routed(spool, dtype, lengths, is_val, cut):
                writers[split].add(tokens)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        (train_shards, train_bytes), (val_shards, val_bytes) = (writers[k].close() for k in ("train", "val"))
    finally:
        spool.unlink(missing_ok=True)
    meta = {
        "format": FORMAT, "version": VERSION, "source": str(source),
        "tokenizer": tok.kind, "tokenizer_spec": str(tokenizer), "tokenizer_file": TOKENIZER_FILE,
        "vocab_size": vocab_size, "eot_id": eot_id, "dtype": np.dtype(dtype).name,
        "n_documents": len(lengths), "split": split_kind, "seed": seed, "val_fraction": val_fraction,
        "train": {"documents": n_train_docs, "tokens": n_tokens - n_val, "shards": train_shards},
        "val": {"documents": n_val_docs, "tokens": n_val, "shards": val_shards},
    }
    with atomic_open(out / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    _remove_stale_shards(out, set(train_shards) | set(val_shards))

    summary = {**meta, "out_dir": str(out), "n_chars": n_chars, "n_tokens": n_tokens,
               "bytes": train_bytes + val_bytes, "seconds": time.perf_counter() - t0,
               "tokens_per_s": n_tokens / max(t_tok, 1e-9)}
    if progress:
        print(
            f"prepared {out}: {len(lengths):,} documents, {n_tokens:,} tokens "
            f"(train {meta['train']['tokens']:,} / val {n_val:,}), {summary['tokens_per_s']:,.0f} tokens/s, "
            f"{len(train_shards)} + {len(val_shards)} shards, {summary['bytes']:,} bytes ({dtype.name})",
            flush=True,
        )
    return summary


# ---------------------------------------------------------------- tokenization

def _needs_training(spec: str) -> bool:
    return spec.strip() == "char" or spec.strip().startswith("bpe")


def _omni_tokenizer(spec: str):
    """The omni tokenizer file `spec` names, or None: with one, the source is chat examples with media."""
    from gptlab.tokenizer import OmniTokenizer, load_tokenizer

    if spec and Path(spec).exists():
        tok = load_tokenizer(spec)
        return tok if isinstance(tok, OmniTokenizer) else None
    return None


def _conversation_pieces(source, tok) -> Iterator[tuple[np.ndarray, bool, int]]:
    """Chat JSONL with content parts (images and audio by path), or a Hugging Face dataset with Image/Audio
    columns -> each conversation's ids + eot, rendered with the one chat template, every modality as its
    codes: the documents of omni pretraining."""
    from gptlab.chat.template import render_ids
    from gptlab.data.hf_rows import is_hf_source
    from gptlab.data.records import read_rows
    from gptlab.omni.media import load_content

    dtype = dtype_for_vocab(tok.vocab_size)
    hf = is_hf_source(source)
    base = Path(source) if hf else Path(source).parent
    for row in read_rows(source):
        where = f"{source}:{'row' if hf else 'line'} {row.get('_line', '?')}"
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise GptlabError(f"{where}: with an omni tokenizer, rows are chat examples {{\"messages\": [...]}}")
        msgs = [{"role": m.get("role"), "content": load_content(m.get("content"), where, base)}
                for m in msgs]
        try:
            ids = render_ids(tok, msgs, add_generation_prompt=False)[0]
        except GptlabError as e:
            raise GptlabError(f"{where}: {e}") from None
        yield np.array(ids + [tok.eot_id], dtype=dtype), True, 0

def _init_worker(tok_path: str) -> None:
    global _worker_tok
    from gptlab.tokenizer import load_tokenizer

    _worker_tok = load_tokenizer(tok_path)


def _encode_with(tok: Any, pieces: list[tuple[str, bool]]) -> list[np.ndarray]:
    """Each piece's ids (+ eot where it ends its document), as arrays of the shard dtype."""
    eot, dtype = tok.eot_id, dtype_for_vocab(tok.vocab_size)
    ids = tok.encode_batch([t for t, _ in pieces])
    return [np.array(i + [eot] if end else i, dtype=dtype) for i, (_, end) in zip(ids, pieces)]


def _encode_pieces(pieces: list[tuple[str, bool]]) -> list[np.ndarray]:
    return _encode_with(_worker_tok, pieces)


def _batches(pieces: Iterator[tuple[str, bool]], target_chars: int) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for p in pieces:
        batch.append(p)
        size += len(p[0])
        if size >= target_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize(pieces: Iterator[tuple[str, bool]], tok: Any, tok_path: Path, num_workers: int | None,
              progress: bool) -> Iterator[tuple[np.ndarray, bool, int]]:
    """Yield (token array, ends its document, characters) per piece, in corpus order. At most two batches
    per worker are in flight, so memory stays bounded whatever the corpus size."""
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 8)
    bar = tqdm(unit="char", unit_scale=True, desc="tokenizing", disable=not progress, dynamic_ncols=True)
    batches = _batches(pieces, _MIN_BATCH_CHARS if workers <= 1 else _MAX_BATCH_CHARS // 4)
    with bar:
        first = next(batches, None)
        if first is None:
            return
        second = next(batches, None)
        ahead = itertools.chain([first] + ([second] if second else []), batches)
        if workers <= 1 or second is None and sum(len(t) for t, _ in first) < _INPROCESS_CHARS:
            for b in ahead:
                for arr, (text, end) in zip(_encode_with(tok, b), b):
                    yield arr, end, len(text)
                bar.update(sum(len(t) for t, _ in b))
            return
        window: deque = deque()
        with mp.get_context().Pool(workers, initializer=_init_worker, initargs=(str(tok_path),)) as pool:
            for batch in ahead:
                window.append((batch, pool.apply_async(_encode_pieces, (batch,))))
                while len(window) > 2 * workers or (window and window[0][1].ready()):
                    yield from _drain(window.popleft(), bar)
            while window:
                yield from _drain(window.popleft(), bar)


def _drain(item, bar) -> Iterator[tuple[np.ndarray, bool, int]]:
    batch, result = item
    for arr, (text, end) in zip(result.get(), batch):
        yield arr, end, len(text)
    bar.update(sum(len(t) for t, _ in batch))


# ---------------------------------------------------------------- spool, split and write

def _spool(pieces: Iterator[tuple[np.ndarray, bool, int]], f) -> tuple[np.ndarray, int]:
    """Append every piece's tokens to `f`; -> (tokens per document, characters)."""
    lengths, current, chars = [], 0, 0
    for arr, end, n in pieces:
        f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        current += len(arr)
        chars += n
        if end:
            lengths.append(current)
            current = 0
    return np.array(lengths, dtype=np.int64), chars


def _split(lengths: np.ndarray, val_fraction: float, seed: int):
    """-> (kind, is_val per document, cut: first val token of a stream split or None, n train docs, n val docs).

    With >= 10 documents, whole documents go to val (a seeded permutation, taken until val holds
    >= val_fraction of the tokens), so no document is cut in two. With fewer documents (e.g. one
    big file) the last val_fraction of the concatenated stream is val.
    """
    total = int(lengths.sum())
    target = val_fraction * total
    is_val = np.zeros(len(lengths), dtype=bool)
    if len(lengths) >= MIN_DOCS_FOR_DOC_SPLIT:
        perm = np.random.default_rng(seed).permutation(len(lengths))
        k = int(np.searchsorted(np.cumsum(lengths[perm]), target, side="left")) + 1
        if k < len(lengths):  # else one huge doc would leave train empty: split the stream instead
            is_val[perm[:k]] = True
            return "documents", is_val, None, int((~is_val).sum()), k
    cut = total - int(round(target))  # first val token
    ends = np.cumsum(lengths)
    d = int(np.searchsorted(ends, cut, side="right"))  # document holding token `cut`
    starts = ends - lengths
    # A document cut in two counts in both splits; empty sides count nowhere.
    n_train = int(((starts < cut) & (lengths > 0)).sum())
    n_val = int(((ends > cut) & (lengths > 0)).sum())
    return "stream", is_val, cut, n_train, n_val if d < len(lengths) or cut < total else 0


def _routed(spool: Path, dtype, lengths: np.ndarray, is_val: np.ndarray, cut: int | None,
            chunk: int = 1 << 24) -> Iterator[tuple[str, np.ndarray]]:
    """The spooled tokens in corpus order, at most `chunk` at a time, each labelled train or val."""
    with open(spool, "rb") as f:
        pos = 0
        for n, val in zip(lengths.tolist(), is_val.tolist()):
            end = pos + n
            while pos < end:
                take = min(chunk, end - pos)
                if cut is not None and pos < cut < pos + take:
                    take = cut - pos
                tokens = np.fromfile(f, dtype=dtype, count=take)
                yield ("val" if val or (cut is not None and pos >= cut) else "train"), tokens
                pos += take


class ShardWriter:
    """Streams tokens into consecutive shards of exactly shard_tokens (the last may be shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int):
        self.out, self.split, self.shard_tokens, self.vocab = out, split, shard_tokens, vocab_size
        self.names: list[str] = []
        self.nbytes = 0
        self.file: ShardFile | None = None

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None:
                self.file = ShardFile(self.out / f"{self.split}_{len(self.names):06d}.bin", self.vocab)
            take = min(len(tokens), self.shard_tokens - self.file.count)
            self.file.append(tokens[:take])
            tokens = tokens[take:]
            if self.file.count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self.nbytes += self.file.close()
        self.names.append(self.file.path.name)
        self.file = None

    def close(self) -> tuple[list[str], int]:
        if self.file is not None:
            self._finish()
        return self.names, self.nbytes

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Delete shards of an earlier, larger prepare into the same folder."""
    for p in out.glob("*.bin"):
        if re.fullmatch(r"(train|val)_\d{6}\.bin", p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
