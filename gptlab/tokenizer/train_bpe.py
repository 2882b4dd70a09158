"""Train a byte-level BPE vocabulary the way GPT-2 did, fast enough for 40k merges in pure Python.

Text is split into chunks with the GPT-2 regex (so merges never cross word/space/punctuation
boundaries), identical chunks are counted once, and each chunk starts as its UTF-8 bytes (ids 0-255,
rank = byte value). Each step merges the most frequent adjacent pair. The work is incremental: we
keep pair counts, an index pair -> chunks containing it, and a lazy max-heap, and each merge only
re-counts the chunks that contain the merged pair.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

import regex
from tqdm.auto import tqdm

from gptlab.errors import GptlabError
from gptlab.tokenizer.base import EOT
from gptlab.tokenizer.bpe import GPT2_PATTERN, BPETokenizer

Pair = tuple[int, int]


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b), left to right, by ``new``."""
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _count_chunks(texts: Iterable[str], pattern: str) -> Counter[bytes]:
    pat = regex.compile(pattern)
    chunks: Counter[str] = Counter()
    for text in texts:
        chunks.update(m.group() for m in pat.finditer(text))
    # surrogatepass: a lone surrogate cannot be UTF-8 encoded; keep training rather than crash on it.
    out: Counter[bytes] = Counter()
    for chunk, n in chunks.items():
        out[chunk.encode("utf-8", "surrogatepass")] += n
    return out


def train_bpe(
    texts: Iterable[str],
    num_merges: int,
    pattern: str = GPT2_PATTERN,
    name: str = "bpe",
    progress: bool = True,
) -> BPETokenizer:
    """Learn up to ``num_merges`` merges (GPT-1: 40,000). Ties go to the smallest (left, right) id pair.

    A merge whose bytes already exist as a token (two different pairs spelling the same string) is
    applied to the chunks but adds no rank, so ``vocab_size <= 256 + num_merges + 1``. Training stops
    early when no pair occurs twice. ``<|endoftext|>`` gets the id after the last rank.
    """
    if isinstance(num_merges, bool) or not isinstance(num_merges, int) or num_merges < 0:
        raise GptlabError(f"num_merges must be a non-negative integer, got {num_merges!r}")
    if isinstance(texts, str):  # a bare string would iterate character by character
        texts = [texts]

    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, n in _count_chunks(texts, pattern).items():
        if len(chunk) > 1:  # single bytes have no pairs to merge
            words.append(list(chunk))
            freqs.append(n)

    counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)  # may hold stale entries; checked on use
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            counts[p] += f
            where[p].add(wi)
    # Lazy max-heap: an entry is live only while its count equals counts[pair].
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)

    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    index: dict[bytes, int] = {t: i for i, t in enumerate(vocab)}

    with tqdm(total=num_merges, desc=f"train {name}", unit="merge", disable=not progress) as bar:
        for _ in range(num_merges):
            while heap and counts.get(heap[0][1], 0) != -heap[0][0]:
                heapq.heappop(heap)
            if not heap or -heap[0][0] < 2:
                break
            (a, b) = heapq.heappop(heap)[1]
            tok = vocab[a] + vocab[b]
            new = index.get(tok)
            if new is None:
                new = index[tok] = len(vocab)
                vocab.append(tok)

            changed: set[Pair] = set()
            for wi in where.pop((a, b), ()):
                old = words[wi]
                merged = _merge_word(old, a, b, new)
                if len(merged) == len(old):
                    continue  # stale index entry: an earlier merge already consumed the pair here
                f = freqs[wi]
                for p in zip(old, old[1:]):
                    counts[p] -= f
                    changed.add(p)
                for p in zip(merged, merged[1:]):
                    counts[p] += f
                    where[p].add(wi)
                    changed.add(p)
                words[wi] = merged
            for p in changed:
                c = counts[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    del counts[p]
            bar.update(1)

    ranks = {t: i for i, t in enumerate(vocab)}
    return BPETokenizer(ranks, pattern, {EOT: len(vocab)}, name=name)
