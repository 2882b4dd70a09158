"""`gptlab prepare`: corpus -> tokenizer file + train/val token shards + meta.json.

Layout of out_dir:
    tokenizer.gptlab.json            the tokenizer (char / bpe:N are trained on ALL documents, so
                                     every character of the val split is in the vocabulary)
    train_000000.bin, ...            token shards (see shards.py), at most shard_tokens each
    val_000000.bin, ...
    meta.json                        written last: its presence marks a complete data dir
Every document is followed by the end-of-text token (GPT-2/3's document separator), so the
token stream is doc0 <eot> doc1 <eot> ... and a training window may span documents.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from gptlab.data.shards import atomic_open, dtype_for_vocab, write_shard
from gptlab.data.sources import iter_documents
from gptlab.errors import GptlabError
from gptlab.run.lock import writes_run_dir

META_FILE = "meta.json"
FORMAT = "gptlab-data"
VERSION = 1
MIN_DOCS_FOR_DOC_SPLIT = 10
# Below this many characters the pool's start-up costs more than it saves (tests lower it).
_INPROCESS_CHARS = 1 << 20
# Documents are sent to workers in batches of roughly this many characters (bounds).
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
    docs = [] if omni else list(iter_documents(source, text_field=text_field))
    tok = omni or build_tokenizer(tokenizer, docs, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    # Drop the old completion marker before the first write: a crash below must not leave an
    # old meta.json describing a mix of old and new files.
    (out / META_FILE).unlink(missing_ok=True)
    tok_path = out / TOKENIZER_FILE
    tok.save(tok_path)
    tok = load_tokenizer(tok_path)  # encode with exactly what workers and later readers load
    vocab_size, eot_id = tok.vocab_size, tok.eot_id

    t1 = time.perf_counter()
    arrays = _conversations(source, tok) if omni else list(_tokenize(docs, tok, tok_path, num_workers, progress))
    n_chars = sum(map(len, docs))
    del docs
    t_tok = time.perf_counter() - t1

    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    n_tokens = int(lengths.sum())
    split_kind, train_pieces, val_pieces, n_train_docs, n_val_docs = _split(arrays, lengths, val_fraction, seed)
    n_val = sum(len(p) for p in val_pieces)
    if n_val == 0:
        raise GptlabError(f"corpus {source} is too small: the val split ({val_fraction:.0%}) is empty")
    if n_val == n_tokens:
        raise GptlabError(f"corpus {source} is too small: the train split is empty")

    dtype = dtype_for_vocab(vocab_size)
    train_shards, train_bytes = _write_split(out, "train", train_pieces, shard_tokens, vocab_size)
    val_shards, val_bytes = _write_split(out, "val", val_pieces, shard_tokens, vocab_size)
    meta = {
        "format": FORMAT, "version": VERSION, "source": str(source),
        "tokenizer": tok.kind, "tokenizer_spec": str(tokenizer), "tokenizer_file": TOKENIZER_FILE,
        "vocab_size": vocab_size, "eot_id": eot_id, "dtype": np.dtype(dtype).name,
        "n_documents": len(arrays), "split": split_kind, "seed": seed, "val_fraction": val_fraction,
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
            f"prepared {out}: {len(arrays):,} documents, {n_tokens:,} tokens "
            f"(train {meta['train']['tokens']:,} / val {n_val:,}), {summary['tokens_per_s']:,.0f} tokens/s, "
            f"{len(train_shards)} + {len(val_shards)} shards, {summary['bytes']:,} bytes ({dtype.name})",
            flush=True,
        )
    return summary


# ---------------------------------------------------------------- tokenization

def _omni_tokenizer(spec: str):
    """The omni tokenizer file `spec` names, or None: with one, the source is chat examples with media."""
    from gptlab.tokenizer import OmniTokenizer, load_tokenizer

    if spec and Path(spec).exists():
        tok = load_tokenizer(spec)
        return tok if isinstance(tok, OmniTokenizer) else None
    return None


def _conversations(source, tok) -> list[np.ndarray]:
    """Chat JSONL with content parts (images and audio by path), or a Hugging Face dataset with Image/Audio
    columns -> each conversation's ids + eot, rendered with the one chat template, every modality as its
    codes: the documents of omni pretraining."""
    from gptlab.chat.template import render_ids
    from gptlab.data.hf_rows import is_hf_source
    from gptlab.data.records import read_rows
    from gptlab.omni.media import load_content

    dtype = dtype_for_vocab(tok.vocab_size)
    out = []
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
        out.append(np.array(ids + [tok.eot_id], dtype=dtype))
    return out

def _init_worker(tok_path: str) -> None:
    global _worker_tok
    from gptlab.tokenizer import load_tokenizer

    _worker_tok = load_tokenizer(tok_path)


def _encode_with(tok: Any, texts: list[str]) -> list[np.ndarray]:
    """Each document's ids followed by eot, as arrays of the shard dtype (compact to pickle/hold)."""
    eot, dtype = tok.eot_id, dtype_for_vocab(tok.vocab_size)
    return [np.array(ids + [eot], dtype=dtype) for ids in tok.encode_batch(texts)]


def _encode_docs(texts: list[str]) -> list[np.ndarray]:
    return _encode_with(_worker_tok, texts)


def _batches(docs: list[str], target_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= target_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize(docs: list[str], tok: Any, tok_path: Path, num_workers: int | None, progress: bool) -> Iterator[np.ndarray]:
    """Yield one token array (document + eot) per document, in document order."""
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 8)
    total_chars = sum(map(len, docs))
    bar = tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1 or total_chars < _INPROCESS_CHARS or len(docs) == 1:
            for batch in _batches(docs, _MIN_BATCH_CHARS):
                yield from _encode_with(tok, batch)
                bar.update(len(batch))
            return
        # ~4 batches per worker keeps all workers busy while bounding per-task memory.
        target = max(_MIN_BATCH_CHARS, min(_MAX_BATCH_CHARS, total_chars // (4 * workers)))
        with mp.get_context().Pool(workers, initializer=_init_worker, initargs=(str(tok_path),)) as pool:
            batches = list(_batches(docs, target))
            for batch, arrays in zip(batches, pool.imap(_encode_docs, batches)):  # imap keeps order
                yield from arrays
                bar.update(len(batch))


# ---------------------------------------------------------------- split and write

def _split(arrays: list[np.ndarray], lengths: np.ndarray, val_fraction: float, seed: int):
    """Return (kind, train pieces, val pieces, n train docs, n val docs); pieces keep corpus order.

    With >= 10 documents, whole documents go to val (a seeded permutation, taken until val holds
    >= val_fraction of the tokens), so no document is cut in two. With fewer documents (e.g. one
    big file) the last val_fraction of the concatenated stream is val.
    """
    total = int(lengths.sum())
    target = val_fraction * total
    if len(arrays) >= MIN_DOCS_FOR_DOC_SPLIT:
        perm = np.random.default_rng(seed).permutation(len(arrays))
        k = int(np.searchsorted(np.cumsum(lengths[perm]), target, side="left")) + 1
        if k < len(arrays):  # else one huge doc would leave train empty: split the stream instead
            is_val = np.zeros(len(arrays), dtype=bool)
            is_val[perm[:k]] = True
            train = [a for a, v in zip(arrays, is_val) if not v]
            val = [a for a, v in zip(arrays, is_val) if v]
            return "documents", train, val, len(train), len(val)
    n_val = int(round(target))
    cut = total - n_val  # first val token
    ends = np.cumsum(lengths)
    d = int(np.searchsorted(ends, cut, side="right"))  # document holding token `cut`
    train, val = list(arrays[:d]), list(arrays[d + 1:])
    if d < len(arrays):
        local = cut - (int(ends[d - 1]) if d else 0)
        train.append(arrays[d][:local])
        val.insert(0, arrays[d][local:])
    # A document cut in two counts in both splits.
    return "stream", train, val, sum(len(p) > 0 for p in train), sum(len(p) > 0 for p in val)


def _write_split(out: Path, split: str, pieces: list[np.ndarray], shard_tokens: int, vocab_size: int):
    """Write pieces as consecutive shards of exactly shard_tokens (the last may be shorter)."""
    names: list[str] = []
    nbytes = 0
    buf: list[np.ndarray] = []
    buffered = 0

    def emit(tokens: np.ndarray) -> None:
        nonlocal nbytes
        name = f"{split}_{len(names):06d}.bin"
        nbytes += write_shard(out / name, tokens, vocab_size)
        names.append(name)

    for piece in pieces:
        if not len(piece):
            continue
        buf.append(piece)
        buffered += len(piece)
        if buffered >= shard_tokens:
            data = np.concatenate(buf)
            n_full = len(data) // shard_tokens
            for i in range(n_full):
                emit(data[i * shard_tokens:(i + 1) * shard_tokens])
            rest = data[n_full * shard_tokens:]
            buf, buffered = ([rest] if len(rest) else []), len(rest)
    if buffered:
        emit(np.concatenate(buf))
    return names, nbytes


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Delete shards of an earlier, larger prepare into the same folder."""
    for p in out.glob("*.bin"):
        if re.fullmatch(r"(train|val)_\d{6}\.bin", p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
